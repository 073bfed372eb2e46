"""Refinement after rounding: tune a compressed model's continuous parameters against the float model, codes frozen.

**Block-wise reconstruction** (``refine_blocks``): the transformer blocks are visited in order on
the *float* model's hidden states. For block ``b`` the inputs ``X_b`` are what the float model
feeds it and the targets ``Y_b`` what the float block returns (the asymmetric target GPTAQ argues
for: each compressed block learns to reproduce the float block on float inputs, so errors are not
chased through earlier compressed blocks). Trained: the lowered continuous fields of every Linear
weight in the block (``Codec.trainable_lowered`` through ``LoweredForm``: the group steps, in the log
domain, for the flagship), and the block's norm weights and biases (stored raw). Loss: the block
output's squared error relative to the target's power, Adam, the last batch held out; the state
with the lowest held-out loss is kept (so a block never gets worse on held-out data). The steps
are then written back through ``Codec.from_lowered`` (which rounds them to their storage types;
the held-out loss is measured *after* that rounding).

End-to-end distillation of the same parameters is ``rbe finetune --teacher SRC`` (not chained
here: measured on SmolLM2's flagship file it raised the KL, see docs/quality.md).

Checkpoints: after every block the partly refined model goes to ``<out>.refine-ckpt/``
(``model.rbe`` + ``state.json``); ``resume=True`` continues after the last completed block.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from ..abc import Encoded, lifts
from ..container import Writer
from ..files import open as open_rbe
from ..models.spec import ModelError
from ..registry import get_codec
from ..training.lowered import LoweredForm
from .calibration import _block_list, _Stop, source_model
from .inputs import run_input

log = logging.getLogger("rbe.refine")

#: Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = ("model", "source", "epochs", "lr", "norm_lr", "tokens", "window", "batch", "data")


def _trainable_form(enc: Encoded):
    """The training form of a tensor whose codec lowers and lifts and trains some field; else None."""
    if not lifts(enc.codec) or not getattr(enc.codec, "trainable_lowered", ()):
        return None
    return LoweredForm(enc.codec)


class _Tuned:
    """One Linear weight's trainable fields (float32 leaves) and its decode."""

    def __init__(self, enc: Encoded, form):
        self.enc, self.form = enc, form
        self.params = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True)
                       for k, v in form.params(enc).items()}

    def weight(self) -> torch.Tensor:
        return self.form.decode(self.enc, self.params)

    def encoded(self) -> Encoded:
        return self.form.write(self.enc, {k: v.detach().double().numpy() for k, v in self.params.items()})

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in state.items():
                self.params[k].copy_(v)


def _output(y):
    return y[0] if isinstance(y, tuple) else y


def _rel_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def refine_blocks(model, factory, encodings: dict[str, Encoded], data: list, *, epochs: int = 4, lr: float = 1e-3,
                  norm_lr: float = 1e-4, start: int = 0,
                  on_block: Callable[[int, dict[str, Encoded], dict[str, np.ndarray], dict], None] | None = None,
                  progress: bool = False) -> tuple[dict[str, Encoded], dict[str, np.ndarray], list[dict]]:
    """Block-wise reconstruction of the compressed ``encodings`` in the float ``model`` (see the module
    docstring). ``data``: model inputs (the last one held out). Blocks before ``start`` are skipped
    (resume). Returns (refined encodings, refined raw 1-D tensors by name, per-block statistics);
    ``on_block(b, encodings, raws, stats)`` runs after each block."""
    from tqdm.auto import tqdm

    if len(data) < 2:
        raise ModelError("refinement needs at least two batches of data (one is held out)")
    _parent, _attr, blocks = _block_list(model)
    if not len(blocks):
        raise ModelError("the model has no list of transformer blocks to refine")
    layer_name = {id(layer): n for n, (layer, transposed) in factory.linears.items()
                  if not transposed and n in encodings and n not in factory.embeddings}
    raw_name = {t.data_ptr(): n for n, t in factory.params.items()}
    cached: list[tuple[tuple, dict]] = []

    def grab(mod, args, kwargs):
        cached.append((args, kwargs))
        raise _Stop

    hook = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for inputs in data:
                try:
                    run_input(model, inputs)
                except _Stop:
                    pass
    finally:
        hook.remove()
    out_enc, out_raw, stats = dict(encodings), {}, []
    train, held = list(range(len(cached) - 1)), len(cached) - 1
    bar = tqdm(total=(len(blocks) - start) * epochs, unit="epoch", disable=not progress, desc="rbe refine",
               dynamic_ncols=True)
    try:
        for b, block in enumerate(blocks):
            with torch.no_grad():
                targets = [_output(block(*a, **k)) for a, k in cached]
            if b >= start:
                tuned, norms, st = _refine_block(block, layer_name, raw_name, encodings, cached, targets, train, held,
                                                 epochs, lr, norm_lr, bar)
                out_enc.update({n: t.encoded() for n, t in tuned.items()})
                out_raw.update({n: v.detach().numpy().copy() for n, v in norms.items()})
                st["block"] = b
                stats.append(st)
                log.info("block %d: held-out error %.4g -> %.4g (%.1f s)", b, st["before"], st["after"], st["seconds"])
                if on_block is not None:
                    on_block(b, out_enc, out_raw, st)
            cached = [((y, *a[1:]), k) for (a, k), y in zip(cached, targets, strict=True)]  # the float chain
    finally:
        bar.close()
    return out_enc, out_raw, stats


def _refine_block(block, layer_name, raw_name, encodings, cached, targets, train, held, epochs, lr, norm_lr, bar):
    """One block (see ``refine_blocks``): returns (name -> trainee as stored, raw name -> norm, stats)."""
    t0 = time.perf_counter()
    rel = {id(m): r for r, m in block.named_modules()}
    layers = {}  # relative module name -> (tensor name, module, form)
    for m in block.modules():
        n = layer_name.get(id(m))
        form = _trainable_form(encodings[n]) if n is not None else None
        if form is not None:
            layers[rel[id(m)]] = (n, m, form)
    originals = {r: p.detach().clone() for r, p in block.named_parameters() if p.dim() == 1 and p.data_ptr() in raw_name}
    norms = {r: v.clone().requires_grad_(True) for r, v in originals.items()}

    def held_out(trainees) -> float:
        a, k = cached[held]
        with torch.no_grad():
            weights = {f"{r}.weight": t.weight() for r, t in trainees.items()}
            return float(_rel_error(_output(functional_call(block, {**weights, **norms}, a, k)), targets[held]))

    stored = {r: _Tuned(encodings[n], form) for r, (n, _m, form) in layers.items()}
    with torch.no_grad():
        for r, v in norms.items():
            v.copy_(originals[r])
    before = held_out(stored)
    trainees = {r: _Tuned(encodings[n], form) for r, (n, _m, form) in layers.items()}
    groups = [{"params": [p for t in trainees.values() for p in t.params.values()], "lr": lr}]
    if norms:
        groups.append({"params": list(norms.values()), "lr": norm_lr})
    opt = torch.optim.Adam(groups)

    def snapshot():
        return {r: t.state() for r, t in trainees.items()}, {r: v.detach().clone() for r, v in norms.items()}

    best_err, best = math.inf, snapshot()
    for epoch in range(epochs):
        for i in train:
            opt.zero_grad(set_to_none=True)
            weights = {f"{r}.weight": t.weight() for r, t in trainees.items()}
            a, k = cached[i]
            loss = _rel_error(_output(functional_call(block, {**weights, **norms}, a, k)), targets[i])
            loss.backward()
            opt.step()
        err = held_out(trainees)
        log.debug("epoch %d: train %.4g held-out %.4g", epoch, loss.item(), err)
        if err < best_err:
            best_err, best = err, snapshot()
        bar.update(1)
    for r, t in trainees.items():
        t.load(best[0][r])
    with torch.no_grad():
        for r, v in norms.items():
            v.copy_(best[1][r])
    # what will be stored: the steps rounded to their storage types
    tuned = {r: _Tuned(t.encoded(), t.form) for r, t in trainees.items()}
    after = held_out(tuned)
    log.debug("held-out %.4g before, %.4g trained, %.4g as stored", before, best_err, after)
    if after >= before:  # no gain on held-out data: keep the block as it was
        tuned, after = stored, before
        with torch.no_grad():
            for r, v in norms.items():
                v.copy_(originals[r])
    return ({layers[r][0]: t for r, t in tuned.items()},
            {raw_name[p.data_ptr()]: norms[r].detach() for r, p in block.named_parameters() if r in norms},
            {"before": before, "after": after, "trained": best_err, "seconds": time.perf_counter() - t0,
             "layers": len(tuned)})


def _checkpoint(ckpt: Path, src_file, encodings, raws, settings, block: int, stats: list[dict]) -> None:
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write(tmp / "model.rbe", src_file, encodings, raws, {})
    (tmp / "state.json").write_text(json.dumps({"format": 1, "block": block, "settings": settings, "stats": stats}))
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(tmp, ckpt)


def _write(out: Path, src_file, encodings: Mapping[str, Encoded], raws: Mapping[str, np.ndarray], extra: dict) -> Path:
    raw = get_codec("raw")
    with Writer(out) as w:
        for n in src_file:
            if n in raws:
                w.add(n, raw.encode(raws[n].reshape(src_file.headers[n]["shape"]), source=src_file.headers[n]["source"]))
            else:
                w.add(n, encodings[n] if n in encodings else src_file[n])
        return w.close({**src_file.metadata, **extra})


def refine(model_path: str | os.PathLike, source: str | os.PathLike, out: str | os.PathLike, *,
           data: str = "builtin:broad", tokens: int = 8192, window: int = 256, batch: int = 2, epochs: int = 2,
           lr: float = 1e-3, norm_lr: float = 1e-4, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write ``out``: the .rbe model ``model_path`` refined block-wise against its float ``source``.

    ``data``: a data spec (``rbe_core.compression.data``); ``tokens`` tokens of its training split
    in windows of ``window`` (encoders: sentences), ``batch`` windows a step, ``epochs`` passes; one
    batch of its held-out split decides early stopping. Returns the statistics (per block: held-out
    relative error before/after, seconds). ``ModelError`` on bad input; ``out`` appears only when
    complete.
    """
    from ..models.sources import open_source
    from . import data as text_data
    from .calibration import batches

    if tokens < window or epochs < 1 or not (lr > 0 and norm_lr >= 0) or window < 2 or batch < 1:
        raise ModelError(f"need tokens >= window >= 2, batch >= 1, epochs >= 1, lr > 0, norm_lr >= 0 "
                         f"(got {tokens}, {window}, {batch}, {epochs}, {lr}, {norm_lr})")
    out = Path(out)
    src_file = open_rbe(model_path)
    src = open_source(source)
    encodings = {n: src_file[n] for n in src_file}
    for n in src.spec.check(src.config, src.shapes):
        if n not in encodings or tuple(encodings[n].shape) != tuple(src.shapes[n]):
            raise ModelError(f"{model_path} and {source} are not the same model ({n})")
    model, factory = source_model(src)
    text = text_data.load(data, model=model)
    train = [inputs for inputs, _mask in batches(model, text.train, tokens, window=window, batch=batch)]
    held = batches(model, text.held_out, window * batch, window=window, batch=batch)[0][0]
    settings = {"model": str(model_path), "source": str(source), "epochs": epochs, "lr": lr, "norm_lr": norm_lr,
                "tokens": tokens, "window": window, "batch": batch, "data": data}
    ckpt = out.with_name(out.name + ".refine-ckpt")
    start, stats = 0, []
    if resume and (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        changed = [k for k in _RESUME_KEYS if state.get("settings", {}).get(k) != settings[k]]
        if changed:
            raise ModelError(f"{ckpt}: cannot resume with a different {', '.join(changed)}")
        done = open_rbe(ckpt / "model.rbe")  # refined tensors of the finished blocks, the rest as they were
        encodings = {n: done[n] for n in done}
        start, stats = int(state["block"]) + 1, list(state.get("stats", []))
        log.info("resuming after block %d", start - 1)
    t0 = time.perf_counter()

    def on_block(b, encs, raws, st):
        stats.append(st)
        _checkpoint(ckpt, src_file, encs, raws, settings, b, stats)

    encs, raws, _new = refine_blocks(model, factory, encodings, [*train, held], epochs=epochs, lr=lr,
                                     norm_lr=norm_lr, start=start, on_block=on_block, progress=progress)
    summary = {"seconds": round(time.perf_counter() - t0, 1), "tokens": tokens, "data": data,
               "data_chars": text.sources,
               "mean_before": float(np.mean([s["before"] for s in stats])) if stats else math.nan,
               "mean_after": float(np.mean([s["after"] for s in stats])) if stats else math.nan}
    _write(out, src_file, encs, raws, {"rbe.refine": summary})
    shutil.rmtree(ckpt, ignore_errors=True)
    return {**summary, "blocks": stats}
