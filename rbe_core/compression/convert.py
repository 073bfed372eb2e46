"""Model conversion (``compress_model``) and HF export (``export_hf``).

Conversion streams the source tensor by tensor: each is loaded (dequantized for GGUF), encoded
and streamed to disk through ``container.Writer``, so the working set is about two copies of the
largest tensor plus a fixed overhead; the output appears atomically at the end. Norms and biases
(1-D tensors) stay ``raw``.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..abc import Encoded
from ..container import Writer
from ..files import open as open_rbe
from ..models import get_spec, model_metadata
from ..models.loading import load_model
from ..models.sources import open_source
from ..models.spec import ModelError
from ..registry import get_codec, list_codecs
from .calibration import encode_calibrated, takes_calibration
from .ray_convert import RayCluster

#: The codec used when neither a codec nor a bit budget is given.
DEFAULT_CODEC = "int8"

#: Codec settings ``target_bpw`` chooses from, in order of preference (best quality first).
#: Unregistered ones are skipped, so a new codec joins by adding its config here.
#: The flagship ``hadamard`` codec at 8..2 bits on its Gaussian (Lloyd–Max) grid; with calibration
#: the bits are allocated per tensor.
CANDIDATES: list[dict[str, Any]] = [{"id": "hadamard", "bits": b, "grid": "normal"} for b in (8, 6, 5, 4, 3, 2)]

#: What a ``target_bpw`` budget without a codec chooses from for encoders: trellis codes. A batch
#: of sentences decodes each weight once, so their lookups cost what the scalar grid's do
#: (all-MiniLM-L6-v2, 193 sentences through the cffi kernels: 6.97 s against 6.91 s on
#: avx512vbmi, 8.27 against 8.32 on avx2), and they fit better: MiniLM at 4.25 bpw, mean cosine on
#: three held-out texts (GFDL-1.3, GPL-3, Apache-2.0) 0.9947 / 0.9941 / 0.9937 against 0.9936 /
#: 0.9927 / 0.9924 (3.25 on GFDL-1.3: 0.9784 against 0.9729); with each tensor's groups chosen too
#: (``TrellisCodec.bit_settings``) 0.9952 / 0.9947 / 0.9946. Causal LMs keep ``CANDIDATES``: they
#: decode one token at a time, where trellis rows cost 4-5x nibbles' on CPUs without AVX-512 VBMI.
ENCODER_CODEC = "trellis"

RAW = {"id": "raw"}


def load_policy(policy: str | os.PathLike | Mapping[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """Policy rules as ``[(glob pattern, codec config)]``, first match wins.

    A policy is a JSON object (or a file holding one) mapping tensor-name glob patterns to a codec
    id or config, e.g. ``{"*embed*": "raw", "*.mlp.*": {"id": "int8"}}``.
    """
    if policy is None:
        return []
    if not isinstance(policy, Mapping):
        try:
            policy = json.loads(Path(policy).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"policy file {policy}: {exc}") from exc
    if not isinstance(policy, Mapping):
        raise ModelError("a policy must be a JSON object {pattern: codec id or config}")
    rules = []
    for pattern, conf in policy.items():
        conf = {"id": conf} if isinstance(conf, str) else conf
        if not isinstance(conf, Mapping) or not isinstance(conf.get("id"), str):
            raise ModelError(f"policy rule {pattern!r}: expected a codec id or a config with 'id', got {conf!r}")
        get_codec(conf)  # fail before any work on an unknown codec or bad config
        rules.append((pattern, dict(conf)))
    return rules


def budget_candidates(codec: str | Mapping[str, Any] | None, *, causal: bool = True) -> list[dict[str, Any]]:
    """The codec settings a ``target_bpw`` budget chooses from: ``codec``'s ``bit_settings()``
    when a codec is given (``ModelError`` when it has none), else the registered ``CANDIDATES`` for
    a causal LM and ``ENCODER_CODEC``'s settings for an encoder."""
    if codec is None and causal:
        return [c for c in CANDIDATES if c["id"] in list_codecs()]
    codec = ENCODER_CODEC if codec is None else codec
    base = get_codec(codec)
    settings = [dict(c.get_config()) for c in base.bit_settings()]
    if not settings:
        raise ModelError(f"codec {base.codec_id!r} offers no bit settings for a --target-bpw budget (Codec.bit_settings)")
    return settings


class _Budget:
    """Chooses a codec per tensor so the running average bits/weight never exceeds ``target``."""

    def __init__(self, target: float, candidates: list[dict[str, Any]]):
        self.target = target
        self.codecs = [get_codec(c) for c in candidates]
        if not self.codecs:
            raise ModelError("no candidate codec for --target-bpw is registered")
        self.last_bpw: dict[int, float] = {}
        self.bits = 0.0
        self.weights = 0

    def _fits(self, bits: float, numel: int) -> bool:
        return self.bits + bits <= self.target * (self.weights + numel) + 1e-9

    def first_guess(self, numel: int) -> int:
        """Index of the first candidate predicted (from its last measured bpw) to fit."""
        for i in range(len(self.codecs)):
            if i not in self.last_bpw or self._fits(self.last_bpw[i] * numel, numel):
                return i
        return len(self.codecs) - 1

    def accept(self, i: int, enc: Encoded, encode) -> Encoded:
        """Return ``enc`` (from candidate ``i``) or a re-encoding with a later candidate that fits."""
        while True:
            self.last_bpw[i] = enc.bits_per_weight
            if self._fits(8.0 * enc.nbytes, enc.numel):
                self.bits += 8.0 * enc.nbytes
                self.weights += enc.numel
                return enc
            if i + 1 >= len(self.codecs):
                ids = ", ".join(c.codec_id for c in self.codecs)
                raise ModelError(f"no registered codec setting ({ids}) reaches {self.target} bits/weight "
                                 f"(tensor {enc.source!r} needs {enc.bits_per_weight:.3f} with the smallest)")
            i += 1
            enc = encode(self.codecs[i])


def _plan(name: str, shape: tuple[int, ...], rules, default: dict[str, Any] | None) -> dict[str, Any] | None:
    """The codec config for ``name``: a policy match, raw for 0/1-D tensors, else ``default``
    (None means: chosen by the bit budget)."""
    for pattern, conf in rules:
        if fnmatch.fnmatchcase(name, pattern):
            return conf
    return RAW if len(shape) < 2 else default


def compress_model(src: str | os.PathLike, out: str | os.PathLike, codec: str | Mapping[str, Any] | None = None,
                   target_bpw: float | None = None, policy=None, *, jobs: int = 1, progress: bool = True,
                   verify_backend: str | None = None, calibration: str | os.PathLike | bool | None = None,
                   calibration_tokens: int | None = None, cluster: str | None = None, smoothing: bool = True) -> Path:
    """Convert a HF directory, .safetensors or .gguf model into a self-contained .rbe file.

    ``codec`` (id or config) encodes every weight matrix; ``target_bpw`` instead picks among
    ``CANDIDATES`` (encoders: ``ENCODER_CODEC``'s settings; with ``codec`` too: among that codec's
    ``bit_settings()``) so the average
    bits/weight over compressed (non-raw) tensors is at most that;
    ``policy`` overrides per tensor-name pattern. ``jobs`` tensors are encoded in parallel.
    ``verify_backend`` runs the converted model (read back from the complete temporary file) once
    on that backend before the rename. ``calibration`` (a text file; None: the built-in text; False:
    off; ``calibration_tokens`` of it, None: ``calibration.default_tokens``) is used under ``target_bpw`` or with a codec that accepts it: bits are allocated per Linear
    weight by measured output damage and weights are encoded layer-sequentially with GPTQ
    (``rbe_core.calibration``); this holds the fp32 model in memory. ``cluster`` (a Ray address,
    "local" or "auto"; ``rbe_core.compression.ray_convert``) runs every encoding and every GPTQ as Ray
    tasks, ``jobs`` (default there: the cluster's CPUs) at a time; the file is the same, bit for bit,
    as a local conversion with the same ``jobs``. ``smoothing`` (calibrated conversions): per-channel
    scales folded from norms into the Linears that read them first (``compression.smoothing``).
    Raises ``ModelError`` on bad input; the output appears only when complete, and an error or
    Ctrl-C leaves nothing behind.
    """
    if target_bpw is not None and not (target_bpw > 0 and math.isfinite(target_bpw)):
        raise ModelError(f"target bits/weight must be a positive number, got {target_bpw}")
    source = open_source(src)
    names = source.spec.check(source.config, source.shapes)
    rules = load_policy(policy)
    default = None if target_bpw is not None else dict(get_codec(codec or DEFAULT_CODEC).get_config())
    candidates = budget_candidates(codec, causal=source.spec.causal) if target_bpw is not None else []
    budget = _Budget(target_bpw, candidates) if target_bpw is not None else None
    plans = {n: _plan(n, source.shapes[n], rules, default) for n in names}
    encode = encode_calibrated
    if cluster is not None:  # joined only once the source, codecs and policy are known to be good
        ray_cluster = RayCluster(cluster)
        jobs = jobs if jobs > 1 else ray_cluster.cpus
        encode = ray_cluster.encode_with
    pre: dict[str, Encoded] = {}
    if calibration is not False and (budget is not None or takes_calibration(get_codec(default or RAW))):
        from .calibration import calibrated_encodings, read_text

        try:
            pre = calibrated_encodings(source, names, plans, target_bpw, read_text(None if calibration is True else calibration),
                                       candidates, jobs=jobs, progress=progress, max_tokens=calibration_tokens,
                                       encode=encode, smoothing=smoothing)
        except ValueError as exc:
            raise ModelError(str(exc)) from exc
        plans.update({n: dict(e.codec.get_config()) for n, e in pre.items()})
    with Writer(out) as writer:
        _encode_all(source, names, plans, budget, pre, encode, jobs, progress, writer)
        metadata = model_metadata(source.spec, source.config, source.tokenizer_json, source.chat_template)
        check = None if verify_backend is None else (lambda tmp: _smoke_test(load_model(tmp, verify_backend)))
        return writer.close(metadata, check=check)


def _encode_all(source, names: list[str], plans: dict[str, dict | None], budget: _Budget | None,
                pre: dict[str, Encoded], encode, jobs: int, progress: bool, writer: Writer) -> None:
    """Encode every tensor of ``names`` into ``writer``, ``jobs`` at a time and in a fixed order:
    its planned codec, or (plan None) the budget's choice; ``pre`` holds those already encoded
    (calibrated) and is emptied."""

    def encode_with(name: str, codec_obj) -> Encoded:
        return pre.pop(name) if name in pre else encode(codec_obj, source.load(name), None, name)

    def task(name: str, guess: int | None):
        conf = plans[name]
        if conf is not None:
            return None, encode_with(name, get_codec(conf))
        return guess, encode_with(name, budget.codecs[guess])

    def submit(name: str):
        """The encoding of ``name``; a budgeted tensor's first guess is taken here, in order, so
        the choices do not depend on which thread or worker finishes first."""
        guess = None if plans[name] is not None else budget.first_guess(math.prod(source.shapes[name]))
        return pool.submit(task, name, guess)

    sizes = {n: math.prod(source.shapes[n]) for n in names}
    # fixed-codec tensors first so the budget knows what they cost before choosing for the rest
    order = sorted(names, key=lambda n: plans[n] is None)
    window = max(1, jobs)
    with ThreadPoolExecutor(window) as pool:
        bar = _progress(sum(sizes.values()), progress)
        futures = {n: submit(n) for n in order[:window]}
        try:
            for k, name in enumerate(order):
                bar.set_postfix_str(name, refresh=False)
                i, enc = futures.pop(name).result()
                if k + window < len(order):
                    futures[order[k + window]] = submit(order[k + window])
                if budget is not None and plans[name] is None:
                    enc = budget.accept(i, enc, lambda c, _n=name: encode_with(_n, c))
                elif budget is not None and plans[name]["id"] != "raw":
                    budget.bits += 8.0 * enc.nbytes
                    budget.weights += enc.numel
                writer.add(name, enc)
                bar.update(sizes[name])
        except BaseException:
            for f in futures.values():
                f.cancel()
            raise
        finally:
            bar.close()


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="w", unit_scale=True, disable=not enabled, desc="rbe convert", dynamic_ncols=True)


def _smoke_test(model) -> None:
    """Run a few tokens through the torch ``model``; ``ModelError`` unless the outputs are finite."""
    import torch

    ids = torch.arange(min(4, model.config["vocab_size"]))[None]
    with torch.no_grad():
        out = model(ids)
    out = out[0] if isinstance(out, tuple) else out
    if not torch.isfinite(out).all():
        raise ModelError("the converted model produces non-finite outputs; nothing was written")


def export_hf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a standard HF directory (model.safetensors with decoded fp32 weights, config.json,
    tokenizer.json, chat_template.jinja) from an .rbe model file. ``out_dir`` must not exist or be
    empty; it appears only when complete."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelError(f"{out_dir}: exists and is not an empty directory; nothing was written")
    f = open_rbe(path)
    info = f.metadata.get("rbe.model")
    if not isinstance(info, dict):
        raise ModelError(f"{path}: holds no model description; it was not written by rbe convert")
    spec, cfg = get_spec(info["architecture"]), info["config"]
    spec.check(cfg, {n: tuple(h["shape"]) for n, h in f.headers.items()})
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        weights = dict(spec.to_hf(cfg, n, np.ascontiguousarray(f[n].decode())) for n in f)
        save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(spec.hf_config(cfg), indent=2))
        if f.metadata.get("rbe.tokenizer"):
            (tmp / "tokenizer.json").write_text(json.dumps(f.metadata["rbe.tokenizer"]))
        if f.metadata.get("rbe.chat_template"):
            (tmp / "chat_template.jinja").write_text(f.metadata["rbe.chat_template"])
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
