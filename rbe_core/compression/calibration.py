"""Calibrated conversion: run the model on text, allocate bits per tensor, GPTQ layer by layer.

``compress_model`` uses this when calibration is on (a ``--target-bpw`` budget, or a codec that
accepts calibration). The source is built as rbe's own dense fp32 model and run on calibration text:

1. **Output damage** (only under a bit budget): every Linear weight alone is replaced by its
   encoding at a probe setting (3 bits) — calibrated by GPTQ against the float model's inputs
   where their Grams fit ``PROBE_GRAM_BYTES`` (:func:`float_grams`), else round-to-nearest — and
   the model is run on the first
   ``damage_tokens`` calibration tokens, from that weight's block on (earlier blocks' outputs are
   cached); the damage is the mean per-token KL divergence to the unmodified model's next-token
   distribution (causal LMs) or the mean ``1 − cos`` of the sentence embeddings (encoders).
   Damage is close to additive over tensors (MiniLM, 4-bit: the sum of the 36 single-tensor
   damages is 0.0366, all at once 0.0354), so it predicts what each tensor costs the model. The
   other settings' damage is scaled from the probe by their input-weighted weight error.
2. **Allocation**: every tensor starts at its cheapest setting; upgrades are taken greedily by
   damage reduction per stored bit while the bits of all budgeted tensors (everything stored
   counted) stay within ``target × weights``.
3. **Layer-sequential encoding**: the blocks are processed in order on cached hidden states, and
   inside a block stage by stage (Linears that read the same tensor, e.g. q/k/v, form a stage), so
   every Linear is calibrated on the inputs it sees *after* all earlier Linears were compressed
   (GPTQ's "true sequential" order). Each stage's Gram matrix ``Σ xᵀx`` goes to codecs that accept
   calibration (``accepts_calibration``); the decoded weights replace the float ones before the
   next stage runs. **Asymmetric target** (GPTAQ): a float copy of each block runs on the float
   model's hidden states beside it, and each weight is first moved to the one that best
   reproduces the *float* layer's output from the compressed model's drifted inputs
   (:func:`asymmetric_target`), then rounded against those inputs.

The default calibration text (``rbe_core/data/calibration.txt``) is CPython standard-library
docstrings (PSF License); see ``rbe_core/data/SOURCE.txt``. The whole fp32 model is held in memory.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import json
import os
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from .inputs import real_tokens, run_input

DEFAULT_TEXT = Path(__file__).parents[1] / "data" / "calibration.txt"
#: Calibration tokens GPTQ sees when none are asked for. Encoders: 16384 (all-MiniLM-L6-v2 at 4.25
#: bpw, tokens spread over the default text: mean cosine 0.9915 with 4096, 0.9925 with 16384; 32 s).
#: Causal LMs: 4096, to keep a 135M model within 5 minutes on 2 cores (SmolLM2 at 4.25 bpw: KL 0.110
#: in 245 s; the first 8192 tokens instead of the first 4096 gave 0.106 vs 0.111, in 255 s vs 224 s).
DEFAULT_TOKENS = {"encoder": 16384, "causal": 4096}
#: Tokens × Linear weights of the calibration a codec that asks for more tokens than
#: ``DEFAULT_TOKENS`` (its ``calibration_tokens``) gets: SmolLM2-135M (106 M Linear weights) takes
#: 16384 (``--codec trellis --target-bpw 3.25``: ~5 min on 2 cores), a 1B model stays at the default
#: (its calibrated conversion took 21 min at 4096 tokens, docs/performance.md).
CALIBRATION_BUDGET = 1 << 41
#: Causal LMs: GPTQ's calibration windows (tokens), in batches of ``2048 // LM_WINDOW``. SmolLM2 at
#: 4.25 bpw, 4096 tokens: 8 windows of 512 KL 0.100, perplexity +5.5%, 241 s; 16 windows of 256
#: KL 0.091, +4.1%, 209 s (twice as many places in the text, and cheaper attention). At 3.25 bpw:
#: 16 × 256 +28.1%, 32 × 128 +33.0%, 32 × 256 (8192 tokens) +34.8% and over the 5-minute budget.
LM_WINDOW = 256
#: Ridge of :func:`asymmetric_target`, × the mean diagonal of ``x̃ᵀx̃``. Measured (--target-bpw, KL /
#: mean cosine on GFDL-1.3): SmolLM2 4.25 without the asymmetric target 0.097, ridge 0.1 0.107,
#: 1.0 0.089; MiniLM 4.25 0.99291 / 0.99307 / 0.99357 (3.0: 0.99341), 3.25 0.9681 / 0.9712 /
#: 0.9724 (3.0: 0.9716).
ASYMMETRIC_RIDGE = 1.0
#: Smoothing (``compression.smoothing``) is folded in where the calibrated Linears keep at least
#: this many bits a weight: it moves the activations' channel spread into the weights, which pays
#: only while they keep the bits to carry it (SmolLM2, ``--codec trellis --target-bpw X``, KL on
#: GFDL-1.3 / GPL-3 with / without it: 4.25 0.0574 / 0.0637, 0.0501 / 0.0532 (five texts: all
#: lower, mean -9%); 3.25 0.2106 / 0.2082, 0.2013 / 0.1945, perplexity higher on four of five
#: texts (+0.1% to +5.4%); 2.25 mean KL +0.8%, perplexity +2.9% to +7.6% on three texts).
SMOOTHING_MIN_BITS = 4.0
#: The allocation's probe is each weight's calibrated encoding (GPTQ against the float model's
#: inputs over ``PROBE_TOKENS`` tokens) where those Grams take at most this many bytes (float64,
#: counted as if every Linear read its own input; SmolLM2-135M: 1.0 GB counted, 0.8 GB held; a 1B
#: model (12 GB counted) falls back to round-to-nearest).
#: GPTQ cuts the damage of some weights far more than others' (SmolLM2 3-bit trellis, first two
#: blocks: to 0.04-0.05 of round-to-nearest's for attn_v, 0.31-0.56 for the MLP), so the round-to-
#: nearest probe gave bits to weights GPTQ would have rounded well. SmolLM2 at 4.25, KL on five
#: held-out texts lower on all five with both codecs (trellis mean 0.0633 -> 0.0608, hadamard
#: 0.0976 -> 0.0907); MiniLM 4.25 mean cosine 0.99516 / 0.99470 / 0.99464 -> 0.99563 / 0.99521 /
#: 0.99477 (docs/quality.md, "The allocation's probe, calibrated").
PROBE_GRAM_BYTES = 2 << 30
#: Calibration tokens the probe's Grams are gathered over (at most the calibration's own), by
#: model kind. SmolLM2 with ``--codec trellis`` (16384 calibration tokens), mean KL on five held-out
#: texts with 16384 instead of 4096: 4.25 bpw 0.0608 -> 0.0599, 3.25 0.2108 -> 0.2068; MiniLM 4.25
#: mean cosine 0.99558 / 0.99495 / 0.99459 with 16384 against 0.99563 / 0.99521 / 0.99477
#: (docs/quality.md, "The probe's tokens, and what else was measured around the allocation").
PROBE_TOKENS = {"encoder": 4096, "causal": 16384}


@attrs.frozen(eq=False)
class Gram:
    """Input statistics of one Linear layer: ``xtx = Σ xᵀx`` (float64, in × in) over ``count`` rows."""

    xtx: np.ndarray
    count: int
    #: ``Σ x̃ᵀ x``: the compressed model's inputs ``x̃`` (the rows of ``xtx``) against the float
    #: model's ``x`` for the same tokens, when known (see :func:`asymmetric_target`).
    cross: np.ndarray | None = None

    @property
    def hessian(self) -> np.ndarray:
        """``XᵀX / n``: the layer-output Hessian GPTQ minimises against."""
        return self.xtx / max(1, self.count)


def read_text(calibration: str | os.PathLike | None) -> str:
    """The calibration text: the file ``calibration``, or the built-in default when None."""
    path = DEFAULT_TEXT if calibration is None else Path(calibration)
    from ..models.spec import ModelError

    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ModelError(f"calibration text {path}: {exc}") from exc
    if not text.strip():
        raise ModelError(f"calibration text {path} is empty")
    return text


def sentences(text: str, min_words: int = 4) -> list[str]:
    """Sentences of ``text`` (split at . ! ? and blank lines, whitespace collapsed), ≥ ``min_words`` words."""
    parts = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    out = [" ".join(p.split()) for p in parts]
    return [s for s in out if len(s.split()) >= min_words]


def source_model(source, tensors: Mapping[str, Any] | None = None):
    """(rbe's dense fp32 model of an opened ``Source``, its recording layer factory).

    ``tensors`` (name -> array) overrides what is loaded from the source.
    """
    from ..models.build import MODEL_CLASSES
    from ..models.common import LayerFactory
    from ..models.spec import load_tokenizer
    from ..registry import get_codec

    class Recorder(LayerFactory):
        """A dense factory that remembers which tensors became Linear layers, embeddings and
        small parameters (``params``: name -> the tensor the model holds)."""

        def __init__(self, encoded):
            super().__init__(encoded, dense=True)
            self.linears: dict[str, tuple[Any, bool]] = {}
            self.embeddings: set[str] = set()
            self.params: dict[str, Any] = {}

        def param(self, name):
            self.params[name] = out = super().param(name)
            return out

        def linear(self, weight, bias=None, *, transposed=False):
            layer = super().linear(weight, bias, transposed=transposed)
            self.linears[weight] = (layer, transposed)
            self.params.pop(weight, None)
            if bias is not None:
                self.params[bias] = layer.bias
            return layer

        def embedding(self, name):
            self.embeddings.add(name)
            return super().embedding(name)

    class Loaded(Mapping):
        """name -> the tensor as a ``raw`` encoding, loaded when asked for (and not kept: the model
        holds the only copy of the weights)."""

        def __getitem__(self, n):
            if n not in known:
                raise KeyError(n)
            return raw.encode(tensors[n] if n in tensors else source.load(n), source=n)

        def __contains__(self, n):
            return n in known

        def __iter__(self):
            return iter(names)

        def __len__(self):
            return len(names)

    raw = get_codec("raw")
    names = source.spec.check(source.config, source.shapes)
    known, tensors = set(names), tensors or {}
    factory = Recorder(Loaded())
    model = MODEL_CLASSES[source.spec.name](source.config, factory, load_tokenizer(source.tokenizer_json)).eval()
    factory.tensors = {}  # the model holds its own copies now
    for p in model.parameters():
        p.requires_grad_(False)
    return model, factory


def batches(model, text: str, max_tokens: int = 4096, window: int = 512, batch: int = 4) -> list[tuple[tuple, Any]]:
    """Model inputs from ``text``: ``[(args, token mask or None)]``, about ``max_tokens`` tokens in all,
    spread evenly over the whole text (not its first ``max_tokens``: more variety for the same cost).

    Causal LMs get windows of ``window`` tokens (the model's own tokenizer; seeded random ids when the
    model has none); encoders get padded batches of the text's sentences.
    """
    import torch

    from ..models.common import CausalLM

    tok = model.tokenizer
    if isinstance(model, CausalLM):
        window = max(2, min(window, model.context_length))
        if tok is not None:
            ids = tok.encode(text).ids
        else:
            ids = np.random.default_rng(0).integers(0, model.config["vocab_size"], max_tokens).tolist()
        rows = [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)] or [ids[:max_tokens]]
        wanted = max(1, min(len(rows), max_tokens // window))
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, wanted).round().astype(int)]
        return [((torch.tensor(rows[i : i + batch]),), None) for i in range(0, len(rows), batch)]
    sents, out, used = sentences(text), [], 0
    if tok is None or not sents:
        vocab = model.config["vocab_size"]
        gen = torch.Generator().manual_seed(0)
        return [((torch.randint(0, vocab, (batch, 64), generator=gen),), None)
                for _ in range(max(1, max_tokens // (64 * batch)))]
    lengths = [len(tok.encode(s).ids) for s in sents]
    stride = max(1, round(sum(lengths) / max_tokens))
    chosen = []
    for i in range(0, len(sents), stride):  # every stride-th sentence, about max_tokens tokens
        if used >= max_tokens:
            break
        chosen.append((lengths[i], sents[i]))
        used += lengths[i]
    chosen = [s for _n, s in sorted(chosen)]  # similar lengths together: little padding
    for i in range(0, len(chosen), 2 * batch):
        enc = tok.encode_batch(chosen[i : i + 2 * batch])
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc])
        out.append(((ids, mask, torch.tensor([e.type_ids for e in enc])), mask.reshape(-1).bool()))
    return out


def _block_list(model) -> tuple[Any, str | None, Any]:
    """(parent module, attribute name, ModuleList) of the model's transformer blocks: the ModuleList
    holding the most parameters, at any depth (rbe's models: a direct child; HF models e.g.
    ``model.layers``, ``transformer.h``, ``encoder.layer``); (model, None, []) when it has none."""
    import torch

    best, best_size = (model, None, []), 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) > 1:
                size = sum(p.numel() for p in child.parameters()) + sum(b.numel() for b in child.buffers())
                if size > best_size:
                    best, best_size = (parent, name, child), size
    return best


def is_causal(model) -> bool:
    """rbe's causal LMs, and models that generate (``transformers``' ``can_generate()``)."""
    from ..models.common import CausalLM

    return isinstance(model, CausalLM) or (callable(getattr(model, "can_generate", None)) and bool(model.can_generate()))


def model_kind(model) -> str:
    """``"causal"`` or ``"encoder"``: the key of the per-kind tables (``DEFAULT_TOKENS``, ``PROBE_TOKENS``)."""
    return "causal" if is_causal(model) else "encoder"


def _scored_output(model, out, mask):
    """What output damage is measured on: next-token log-probabilities (causal LMs, float32), or the
    sentence embedding (masked mean of the last hidden states, normalised) of encoders."""
    import torch
    import torch.nn.functional as F

    if is_causal(model):
        return F.log_softmax((out.logits if hasattr(out, "logits") else out[0]).float(), -1)
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    m = torch.ones(out.shape[:2]) if mask is None else mask.reshape(out.shape[:2]).float()
    pooled = (out * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
    return F.normalize(pooled, dim=-1)


def _damage(model, ref, cur) -> float:
    """Mean per-token KL(ref ‖ cur) (causal LMs) or mean ``1 − cos`` of the sentence embeddings."""
    if is_causal(model):
        return float((ref.exp() * (ref - cur)).sum(-1).mean())
    return float((1.0 - (ref * cur).sum(-1)).mean())


def output_damage(model, factory, data, names: list[str], replace: Callable[[str], np.ndarray], *,
                  head_stride: int = 4) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Measured damage of replacing each Linear weight alone: (name -> damage, name -> input power).

    For every Linear weight in ``names`` the model runs on ``data`` with only that weight replaced
    by ``replace(name)`` (shaped as the layer holds it; called on a worker thread, one weight ahead
    of the one being run, while every other weight holds its own value), and its output is compared
    with the unmodified model's (:func:`_damage`). Blocks before the replaced weight's block are skipped by feeding
    that block its cached inputs. Causal LMs score every ``head_stride``-th position (the LM head
    dominates the cost). Input power: the mean squared input per input feature of each Linear
    (ones for a layer the pass never reaches).
    """
    import torch

    parent, attr, blocks = _block_list(model)
    block_of = {id(m): b for b, block in enumerate(blocks) for m in block.modules()}
    name_of = {id(factory.linears[n][0]): n for n in names}
    power: dict[str, Any] = {}
    counts: dict[str, int] = {}
    state: dict[str, Any] = {"mask": None, "batch": 0}
    cached: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]

    def record(mod, args):
        rows = args[0].detach().reshape(-1, args[0].shape[-1])
        rows = real_tokens(rows, state["mask"]).double()
        n = name_of[id(mod)]
        power[n] = power.get(n, 0) + rows.square().sum(0)
        counts[n] = counts.get(n, 0) + rows.shape[0]

    def scored(args, mask):
        return _scored_output(model, run_input(model, args), mask)

    head = getattr(model, "lm_head", None)
    strided = [] if head is None or head_stride <= 1 else [
        head.register_forward_pre_hook(lambda mod, a: (a[0][:, ::head_stride], *a[1:]))]
    recording = [layer.register_forward_pre_hook(record) for layer, _t in factory.linears.values() if id(layer) in name_of]
    recording += [block.register_forward_pre_hook(lambda mod, a, k, b=b: cached[b].append((a, k)), with_kwargs=True)
                  for b, block in enumerate(blocks)]

    def run_from(b: int | None) -> float:
        """Mean damage over ``data`` of the current weights, running from block ``b`` (None: whole model)."""
        with contextlib.nullcontext() if b is None else _fed_from(parent, attr, b, cached[b], state):
            total = 0.0
            for i, ((args, mask), ref) in enumerate(zip(data, refs, strict=True)):
                state["batch"] = i
                total += _damage(model, ref, scored(args, mask))
            return total / len(data)

    try:
        with torch.no_grad():
            refs = []
            for args, mask in data:
                state["mask"] = mask
                refs.append(scored(args, mask))
            for h in recording:
                h.remove()
            damage = {}
            with ThreadPoolExecutor(1) as pool:  # the next replacement is made while the model runs
                ahead = pool.submit(replace, names[0]) if names else None
                for i, n in enumerate(names):
                    layer, _t = factory.linears[n]
                    new = ahead.result()
                    ahead = pool.submit(replace, names[i + 1]) if i + 1 < len(names) else None
                    saved = layer.weight.detach().clone()
                    layer.weight.copy_(torch.from_numpy(np.asarray(new, dtype=np.float32)).reshape(saved.shape))
                    del new
                    try:
                        damage[n] = max(0.0, run_from(block_of.get(id(layer))))
                    finally:
                        layer.weight.copy_(saved)
    finally:
        for h in recording + strided:
            h.remove()
    inputs = {n: (power[n] / counts[n]).numpy() if n in power else np.ones(factory.linears[n][0].weight.shape[1])
              for n in names}
    return damage, inputs


@contextlib.contextmanager
def _fed_from(parent, attr: str, b: int, inputs: list, state: dict[str, Any]):
    """While inside, the model runs from block ``b`` of ``getattr(parent, attr)`` on: the blocks
    before it are left out and block ``b`` gets ``inputs[state["batch"]]`` (its cached (args,
    kwargs)) instead of what the model feeds it."""
    import torch

    blocks = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList(list(blocks)[b:]))
    feed = blocks[b].register_forward_pre_hook(lambda mod, a, k: inputs[state["batch"]], with_kwargs=True)
    try:
        yield
    finally:
        feed.remove()
        setattr(parent, attr, blocks)


def input_sq_error(delta: np.ndarray, transposed: bool) -> np.ndarray:
    """``Σ_j ΔW_jk²`` per input feature ``k`` of a weight error ``delta`` (as stored: (out, in), or
    (in, out) when ``transposed``)."""
    return np.square(delta.astype(np.float64)).sum(1 if transposed else 0)


def weighted_error(delta: np.ndarray, d: np.ndarray, transposed: bool) -> float:
    """``Σ_jk ΔW_jk² d_k``: the layer-output error of a weight error ``delta`` under inputs of power ``d``."""
    return float(input_sq_error(delta, transposed) @ d)


def allocate(costs: Mapping[str, list[float]], errors: Mapping[str, list[float]], budget_bits: float) -> dict[str, int]:
    """Setting index per tensor minimising the summed error with ``Σ cost ≤ budget_bits`` (greedy).

    Every tensor starts at its cheapest setting; the upgrade with the largest error reduction per
    extra bit (to any more expensive setting) is applied while it fits. ``ValueError`` when even the
    cheapest settings exceed the budget.
    """
    pick = {n: int(np.argmin(c)) for n, c in costs.items()}
    spent = sum(costs[n][i] for n, i in pick.items())
    if spent > budget_bits + 1e-6:
        raise ValueError(f"the cheapest settings need {spent:.0f} bits, the budget is {budget_bits:.0f}")

    def best_upgrade(n):
        i, c, e = pick[n], costs[n], errors[n]
        options = [((e[i] - e[j]) / (c[j] - c[i]), j) for j in range(len(c)) if c[j] > c[i] and e[j] < e[i]]
        return max(options) if options else None

    heap = []
    for n in pick:
        up = best_upgrade(n)
        if up:
            heapq.heappush(heap, (-up[0], n, pick[n], up[1]))
    while heap:
        _, n, frm, to = heapq.heappop(heap)
        if pick[n] != frm:
            continue
        extra = costs[n][to] - costs[n][frm]
        if spent + extra <= budget_bits + 1e-6:
            pick[n], spent = to, spent + extra
        else:  # try a smaller step for this tensor
            errs = errors[n]
            smaller = [((errs[frm] - errs[j]) / (costs[n][j] - costs[n][frm]), j) for j in range(len(errs))
                       if costs[n][frm] < costs[n][j] < costs[n][to] and errs[j] < errs[frm]]
            if smaller:
                heapq.heappush(heap, (-max(smaller)[0], n, frm, max(smaller)[1]))
            continue
        up = best_upgrade(n)
        if up:
            heapq.heappush(heap, (-up[0], n, pick[n], up[1]))
    return pick


def _extrapolated(codec, settings: list) -> Any:
    """The 4-bit setting of the same codec whose error predicts ``codec``'s (bits > 4), else None."""
    if getattr(codec, "bits", 0) <= 4:
        return None
    for c in settings:
        if getattr(c, "bits", None) == 4 and type(c) is type(codec) and attrs.evolve(c, bits=codec.bits) == codec:
            return c
    return None


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def takes_calibration(codec) -> bool:
    """True when calibration changes how ``codec`` encodes: its own (``accepts_calibration``), or
    GPTQ on its lowered grid (a codec that lowers and lifts)."""
    from ..abc import lifts

    return bool(getattr(codec, "accepts_calibration", False)) or lifts(codec)


def encode_calibrated(codec, w: np.ndarray, gram: Gram | None, source: str):
    """``codec.encode`` with the calibration it takes (none when ``gram`` is None): its own, or
    GPTQ on its lowered grid."""
    from .gptq import DEFAULT_DAMP, calibrated_encode

    if gram is not None and gram.cross is not None:
        w = asymmetric_target(w, gram)
    if gram is None or getattr(codec, "accepts_calibration", False):
        return codec.encode(w, calibration=gram, source=source)
    return calibrated_encode(codec, w, gram, source=source, damp=float(getattr(codec, "damp", DEFAULT_DAMP)))


def asymmetric_target(w: np.ndarray, gram: Gram, ridge: float = ASYMMETRIC_RIDGE) -> np.ndarray:
    """The weight that, fed the compressed model's inputs ``x̃``, best reproduces the float layer on
    the float inputs ``x`` (GPTAQ's asymmetric calibration, Li et al. 2025):
    ``argmin_W' ‖x̃ W'ᵀ − x Wᵀ‖² = W + W (x − x̃)ᵀ x̃ (x̃ᵀx̃ + λI)⁻¹``, ``λ`` = ``ridge`` × the mean
    diagonal of ``x̃ᵀx̃`` (equal inputs give ``W`` back; the ridge keeps the fit from chasing the
    calibration tokens' noise). Rounding ``W'`` against ``x̃ᵀx̃`` then
    minimises the distance to the float layer's output, not to the float weight on drifted inputs.
    The correction is computed in float32 (the ridge keeps the system well conditioned, and the
    correction is small next to ``W``: its error is of the order of ``W``'s own float32 rounding)."""
    import torch

    h = gram.xtx
    drift = torch.from_numpy((gram.cross.T - h).astype(np.float32))  # (x − x̃)ᵀ x̃
    damped = torch.from_numpy(h.astype(np.float32))
    damped.diagonal().add_(ridge * float(np.mean(np.diag(h))) + 1e-12)
    w32 = torch.from_numpy(np.asarray(w, dtype=np.float32))
    return (w32 + torch.cholesky_solve((w32 @ drift).T, torch.linalg.cholesky(damped)).T).numpy()


def sequential_encode(model, factory, data, codecs: Mapping[str, Any], *, jobs: int = 1,
                      on_encoded: Callable[[str, Any], None] | None = None,
                      encode: Callable = encode_calibrated, asymmetric: bool = True) -> dict[str, Any]:
    """Encode every weight in ``codecs`` (name -> codec) that is a Linear of ``model``, layer-sequentially.

    Returns name -> ``Encoded``; each decoded weight is written back into the model before the next
    stage, so later Grams see the compressed earlier layers. Transposed weights (GPT-2's Conv1D)
    get no calibration (their stored rows are inputs, which GPTQ cannot order). ``encode(codec,
    weight, gram, name)`` does each encoding (``jobs`` at a time; e.g. on a Ray cluster).
    ``asymmetric``: a float copy of each block runs beside it on the float model's hidden states,
    and the Grams of the Linears inside blocks carry ``cross`` (see :func:`asymmetric_target`).
    """
    import torch

    encoder = _SequentialEncoder(factory, codecs, encode, on_encoded, jobs)
    try:
        with torch.no_grad():
            encoder.run(model, data, asymmetric)
    finally:
        encoder.pool.shutdown()
    return encoder.out


class _SequentialEncoder:
    """One ``sequential_encode``: the Linears left to encode (``todo``: id -> name) and those done
    (``out``: name -> Encoded)."""

    def __init__(self, factory, codecs: Mapping[str, Any], encode: Callable,
                 on_encoded: Callable[[str, Any], None] | None, jobs: int):
        self.factory, self.codecs, self.encode, self.on_encoded = factory, codecs, encode, on_encoded
        self.todo = {id(layer): n for n, (layer, _t) in factory.linears.items() if n in codecs}
        self.out: dict[str, Any] = {}
        self.pool = ThreadPoolExecutor(max(1, jobs))

    def run(self, model, data, asymmetric: bool) -> None:
        """Block by block (each block's input cached once), then whatever the blocks left, the
        model run from its last block's cached input."""
        masks = [m for _a, m in data]
        parent, attr, blocks = _block_list(model)
        cached = _block_inputs(model, blocks[0], data) if len(blocks) else []
        float_cached = list(cached) if asymmetric else None
        last_inputs = cached
        for block in blocks:
            def run_block(b, state, block=block):
                state["mask"] = masks[b]
                args, kwargs = cached[b]
                block(*args, **kwargs)

            shadow = None if float_cached is None else _float_inputs(block, float_cached, masks, self.factory)
            self.run_stages([m for m in block.modules() if id(m) in self.todo], run_block, len(cached), shadow)
            last_inputs = list(cached)
            _advance(block, cached)

        feed = {"batch": 0}

        def run_model(b, state):
            state["mask"], feed["batch"] = masks[b], b
            run_input(model, data[b][0])

        tail = [m for m in model.modules() if id(m) in self.todo and self.todo[id(m)] not in self.out]
        with _fed_from(parent, attr, len(blocks) - 1, last_inputs, feed) if len(blocks) else contextlib.nullcontext():
            for i in self.run_stages(tail, run_model, len(data)):
                self.encode_stage([self.todo[i]], None)

    def run_stages(self, modules: list, run: Callable, nbatches: int, shadow: Callable | None = None) -> set[int]:
        """Stage by stage over ``modules``; returns the ids of those the forward pass never reached.
        ``shadow(b, name)``: the float model's input rows to Linear ``name`` on batch ``b`` (for ``Gram.cross``)."""
        remaining = {id(m) for m in modules if id(m) in self.todo}
        while remaining:
            state = self._collect_stage(modules, remaining, run, nbatches, shadow)
            if not state["stage"]:
                break
            cross = None if state["cross"] is None else state["cross"].numpy()
            self.encode_stage(state["stage"], Gram(state["xtx"].numpy(), state["count"], cross))
            remaining -= {id(self.factory.linears[n][0]) for n in state["stage"]}
        return remaining

    def _collect_stage(self, modules: list, remaining: set[int], run: Callable, nbatches: int,
                       shadow: Callable | None) -> dict[str, Any]:
        """Run every batch once, finding the next stage (the Linears that read the same input) and
        summing its Gram (and cross term)."""
        state: dict[str, Any] = {"stage": [], "key": None, "fixed": False, "xtx": None, "count": 0, "mask": None,
                                 "rows": None, "cross": None, "no_cross": False, "input": None}
        hook = self._stage_hook(state, remaining)
        hooks = [m.register_forward_pre_hook(hook) for m in modules if id(m) in remaining]
        try:
            for b in range(nbatches):
                state["rows"] = None
                try:
                    run(b, state)
                except _Stop:
                    pass
                state["fixed"] = True
                if shadow is not None and state["rows"] is not None and not state["no_cross"]:
                    float_rows = shadow(b, state["stage"][0])
                    if float_rows is None or float_rows.shape[0] != state["rows"].shape[0]:
                        state["no_cross"], state["cross"] = True, None  # rows of no common order (experts)
                    else:
                        c = (state["rows"].T @ float_rows).double()
                        state["cross"] = c if state["cross"] is None else state["cross"] + c
        finally:
            for h in hooks:
                h.remove()
        return state

    def _stage_hook(self, state: dict[str, Any], remaining: set[int]) -> Callable:
        """A forward pre-hook: on the first batch it collects the Linears reading the first input
        seen (and stops the pass at a different input); on the others it stops at a Linear outside
        the stage. The stage's first Linear adds its real tokens' rows to the Gram."""
        def hook(mod, args):
            if id(mod) not in remaining:
                return
            x, n = args[0], self.todo[id(mod)]
            if not state["fixed"]:
                # one input (_input_key); the first is held (state["input"]) so that no later tensor
                # can take its memory (a freed input's address reused by the next Linear's input had
                # grouped the two)
                key = _input_key(x)
                if state["key"] is not None and key != state["key"]:
                    raise _Stop
                state["key"], state["input"] = key, x
                if n in state["stage"]:
                    return
                state["stage"].append(n)
            elif n not in state["stage"]:
                raise _Stop
            if n == state["stage"][0]:
                rows = x.detach().reshape(-1, x.shape[-1])
                state["rows"] = rows = real_tokens(rows, state["mask"]).float()
                g = (rows.T @ rows).double()
                state["xtx"] = g if state["xtx"] is None else state["xtx"] + g
                state["count"] += rows.shape[0]

        return hook

    def encode_stage(self, stage: list[str], gram: Gram | None) -> None:
        """Encode the Linears of ``stage`` (``jobs`` at a time) and write their decodes back."""
        import torch

        def one(n):
            layer, transposed = self.factory.linears[n]
            codec = self.codecs[n]
            w = layer.weight.detach().numpy()
            w = np.ascontiguousarray(w.T if transposed else w)
            calib = gram if (gram is not None and not transposed and takes_calibration(codec)) else None
            return n, self.encode(codec, w, calib, n)

        for n, enc in self.pool.map(one, stage):
            layer, transposed = self.factory.linears[n]
            dec = torch.from_numpy(np.ascontiguousarray(enc.decode(), dtype=np.float32))
            with torch.no_grad():
                layer.weight.copy_(dec.T if transposed else dec)
            self.out[n] = enc
            if self.on_encoded is not None:
                self.on_encoded(n, enc)


def _block_inputs(model, first_block, data) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) ``first_block`` receives for each batch of ``data`` (the pass stops there)."""
    cached: list[tuple[tuple, dict]] = []

    def grab(mod, args, kwargs):
        cached.append((args, kwargs))
        raise _Stop

    h = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for args, _mask in data:
            try:
                run_input(model, args)
            except _Stop:
                pass
    finally:
        h.remove()
    return cached


def _advance(block, cached: list, state: dict[str, Any] | None = None) -> None:
    """Replace each cached block input by what ``block`` returns for it (the next block's input);
    ``state["batch"]`` is the batch being run."""
    for b, (args, kwargs) in enumerate(cached):
        if state is not None:
            state["batch"] = b
        y = block(*args, **kwargs)
        cached[b] = ((y[0] if isinstance(y, tuple) else y, *args[1:]), kwargs)


def _float_inputs(block, float_cached: list, masks: list, factory) -> Callable:
    """Run a float copy of ``block`` once over ``float_cached`` (the float model's inputs to it,
    replaced by its outputs), recording what each of its Linears reads. Returns ``shadow(b, name)``
    for :func:`sequential_encode`: the input rows the float model feeds Linear ``name`` on batch
    ``b``; None when they are not one row per token (an expert sees the tokens routed to it, which
    differ between the models)."""
    float_block = copy.deepcopy(block)
    path_of = {id(m): path for path, m in block.named_modules()}
    float_modules = dict(float_block.named_modules())
    tokens = [args[0].shape[:-1].numel() for args, _k in float_cached]
    recorded: list[dict[str, Any]] = [{} for _ in float_cached]
    state = {"batch": 0}

    def recorder(path: str) -> Callable:
        def grab(mod, args):
            b = state["batch"]
            rows = args[0].detach().reshape(-1, args[0].shape[-1])
            recorded[b][path] = real_tokens(rows, masks[b]).float() if rows.shape[0] == tokens[b] else None

        return grab

    paths = [path_of[id(layer)] for layer, _t in factory.linears.values() if id(layer) in path_of]
    hooks = [float_modules[p].register_forward_pre_hook(recorder(p)) for p in paths]
    try:
        _advance(float_block, float_cached, state)
    finally:
        for h in hooks:
            h.remove()

    def shadow(b: int, name: str):
        return recorded[b].get(path_of[id(factory.linears[name][0])])

    return shadow


#: Rows of each weight on which :func:`allocate_settings` measures its settings' errors: every
#: ``rows / ERROR_SAMPLE_SHARE``-th row, at least ``ERROR_SAMPLE_ROWS`` (all rows of smaller ones).
ERROR_SAMPLE_ROWS = 256
ERROR_SAMPLE_SHARE = 8


def error_sample(rows: int) -> np.ndarray:
    """The stored rows whose encoding errors stand for a weight's (evenly spaced, sorted)."""
    k = min(rows, max(ERROR_SAMPLE_ROWS, rows // ERROR_SAMPLE_SHARE))
    return np.unique(np.linspace(0, rows - 1, k).round().astype(np.int64))


def stored_bytes(codec, shape: tuple[int, ...]) -> int:
    """``codec.encode(w).nbytes`` of any ``w`` of 2-D ``shape`` (source name empty). Codecs whose
    payload arrays all have one entry per row are measured on a few rows and scaled (exact);
    others encode zeros of the whole shape."""
    rows, cols = shape
    few, twice = (codec.encode(np.zeros((r, cols), dtype=np.float32)) for r in (8, 16))
    per_row = all(a.shape[0] == 8 and twice.payload[k].shape == (16, *a.shape[1:]) for k, a in few.payload.items())
    if rows < 8 or not per_row:
        return codec.encode(np.zeros(shape, dtype=np.float32)).nbytes
    header = json.dumps({**few.header(), "shape": [rows, cols]})
    return few.payload_nbytes // 8 * rows + len(header)


def float_grams(model, factory, data, names: list[str]) -> dict[str, Gram]:
    """The float model's input Gram of each Linear of ``names`` over ``data`` (one forward pass);
    Linears that read the same input in turn (q/k/v, gate/up) share one ``Gram``."""
    import torch

    name_of = {id(factory.linears[n][0]): n for n in names}
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    reader: dict[str, str] = {}  # name -> the Linear whose sums hold its input's
    state: dict[str, Any] = {"mask": None, "key": None, "input": None, "first": None}

    def record(mod, args):
        x, n = args[0], name_of[id(mod)]
        key = _input_key(x)
        if key == state["key"]:
            reader.setdefault(n, state["first"])
            return
        state["key"], state["input"], state["first"] = key, x, n  # held: no later input takes its memory
        reader.setdefault(n, n)
        rows = real_tokens(x.detach().reshape(-1, x.shape[-1]), state["mask"]).float()
        sums[n] = sums.get(n, 0) + (rows.T @ rows).double()
        counts[n] = counts.get(n, 0) + rows.shape[0]

    hooks = [factory.linears[n][0].register_forward_pre_hook(record) for n in names]
    try:
        with torch.no_grad():
            for args, mask in data:
                state.update(mask=mask, key=None, input=None)
                run_input(model, args)
    finally:
        for h in hooks:
            h.remove()
    grams = {n: Gram(s.numpy(), counts[n]) for n, s in sums.items()}
    return {n: grams[first] for n, first in reader.items()}


def _probe_grams(model, factory, text: str, tokens: int, names: list[str]) -> dict[str, Gram] | None:
    """:func:`float_grams` of the Linears of ``names`` stored untransposed, over ``tokens`` tokens of
    ``text``, where they take at most ``PROBE_GRAM_BYTES`` (every input counted as distinct), else None."""
    names = [n for n in names if not factory.linears[n][1]]
    if sum(8 * factory.linears[n][0].weight.shape[1] ** 2 for n in names) > PROBE_GRAM_BYTES:
        return None
    return float_grams(model, factory, batches(model, text, tokens, window=LM_WINDOW, batch=2048 // LM_WINDOW), names)


def _input_key(x) -> tuple:
    """What makes two Linears' inputs one tensor: the same memory, layout and version (in-place
    writes bump it; inference tensors keep none)."""
    return x.data_ptr(), tuple(x.shape), tuple(x.stride()), 0 if x.is_inference() else x._version


def allocate_settings(model, factory, data, names: list[str], settings: list, target_bpw: float, *,
                      jobs: int = 1, grams: Mapping[str, Gram] | None = None) -> dict[str, Any]:
    """The setting (a codec of ``settings``) of each Linear weight in ``names``, their average bits ≤ ``target_bpw``.

    Each weight's output damage (:func:`output_damage`) is measured once, at the *probe* setting
    (the cheapest one of at least 3 bits; calibrated against the weight's Gram in ``grams`` where
    there is one, else round-to-nearest); the damage of its other settings is
    predicted by scaling with their input-weighted weight error (:func:`weighted_error`, measured
    on the rows of :func:`error_sample`; settings above 4 bits are extrapolated from 4 bits at ×¼
    per bit, uniform-quantizer noise). :func:`allocate` then picks settings minimising the summed
    damage; the settings' errors are measured ``jobs`` weights at a time. ``ValueError`` when even
    the cheapest settings exceed the budget.
    """
    bits = [getattr(c, "bits", 3) for c in settings]
    probe = min((i for i in range(len(settings)) if bits[i] >= 3), key=bits.__getitem__, default=len(settings) - 1)

    def stored(n):
        layer, transposed = factory.linears[n]
        w = layer.weight.detach().numpy()
        return np.ascontiguousarray(w.T if transposed else w), transposed

    probe_errors: dict[str, np.ndarray] = {}  # name -> input_sq_error of the probe on the error sample
    grams = dict(grams or {})

    def probed(n):
        """The probe's decode of weight ``n`` (the errors that scale the other settings' damage
        stay round-to-nearest's, as theirs are)."""
        w, transposed = stored(n)
        dec = settings[probe].encode(w, source=n).decode().reshape(w.shape)
        rows = slice(None) if transposed else error_sample(len(w))
        probe_errors[n] = input_sq_error(dec[rows] - w[rows], transposed)
        gram = grams.pop(n, None)
        if gram is not None and not transposed:
            dec = encode_calibrated(settings[probe], w, gram, n).decode().reshape(w.shape)
        return dec.T if transposed else dec

    damage, power = output_damage(model, factory, data, names, probed)

    def setting_errors(n) -> list[float]:
        """Predicted damage of each setting of weight ``n``."""
        w, transposed = stored(n)
        part = w if transposed else w[error_sample(len(w))]
        errors: list[Any] = []
        for i, c in enumerate(settings):
            if i == probe:
                errors.append(float(probe_errors[n] @ power[n]))
            elif _extrapolated(c, settings) is None:
                errors.append(weighted_error(c.encode(part).decode().reshape(part.shape) - part, power[n], transposed))
            else:
                errors.append(None)
        for i, c in enumerate(settings):  # uniform-quantizer noise: ×1/4 per extra bit
            if errors[i] is None:
                j = settings.index(_extrapolated(c, settings))
                errors[i] = errors[j] * 4.0 ** (settings[j].bits - c.bits)
        scale = damage[n] / errors[probe] if errors[probe] > 0 else 0.0
        return [e * scale for e in errors]

    with ThreadPoolExecutor(max(1, jobs)) as pool:  # numpy encodes release the GIL
        errors = dict(zip(names, pool.map(setting_errors, names), strict=True))
    sizes: dict[tuple[int, tuple[int, ...]], int] = {}
    costs = {}
    for n in names:
        shape = stored(n)[0].shape
        for i, c in enumerate(settings):
            if (i, shape) not in sizes:
                sizes[i, shape] = stored_bytes(c, shape)
        costs[n] = [8.0 * (sizes[i, shape] + len(n)) for i in range(len(settings))]
    weights = sum(int(np.prod(factory.linears[n][0].weight.shape)) for n in names)
    pick = allocate(costs, errors, target_bpw * weights)
    return {n: settings[i] for n, i in pick.items()}


def default_tokens(model, weights: int, codecs) -> int:
    """Calibration tokens when none are asked for: ``DEFAULT_TOKENS`` of the model's kind, or more
    where one of ``codecs`` asks for more (``calibration_tokens``), as far as
    ``CALIBRATION_BUDGET`` allows for ``weights`` Linear weights."""
    base = DEFAULT_TOKENS[model_kind(model)]
    wanted = max((getattr(c, "calibration_tokens", 0) for c in codecs), default=0)
    return max(base, min(wanted, CALIBRATION_BUDGET // max(weights, 1)))


def smoothing_pays(factory, codecs: Mapping[str, Any], target_bpw: float | None) -> bool:
    """Whether the calibrated Linears keep ``SMOOTHING_MIN_BITS`` a weight: the budget's bits, else
    what their ``codecs`` (name -> codec) store."""
    if target_bpw is not None:
        return target_bpw >= SMOOTHING_MIN_BITS
    shapes = {n: tuple(factory.linears[n][0].weight.shape) for n in codecs}
    bits = 8.0 * sum(stored_bytes(c, shapes[n]) for n, c in codecs.items()) / max(1, sum(map(np.prod, shapes.values())))
    return bits >= SMOOTHING_MIN_BITS


def _smoothed(model, factory, data, names: list[str], plans: Mapping[str, Any]) -> dict[str, Any]:
    """Smoothing folded into the Linears ``names`` (those calibration encodes from the model's own
    weights); the encodings of the parameters it changed (norms), by their plans."""
    from ..registry import get_codec
    from .smoothing import smooth

    changed = {p.data_ptr() for p in smooth(model, {n: factory.linears[n] for n in names}, data)}
    return {n: get_codec(plans[n]).encode(np.ascontiguousarray(t.detach().float().numpy()), source=n)
            for n, t in factory.params.items() if t.data_ptr() in changed}


def calibrated_encodings(source, names: list[str], plans: Mapping[str, Any], target_bpw: float | None, text: str,
                         candidates: list[dict[str, Any]], *, jobs: int = 1, progress: bool = False,
                         max_tokens: int | None = None, damage_tokens: int = 256,
                         encode: Callable = encode_calibrated, smoothing: bool = True) -> dict[str, Any]:
    """Encodings for the tensors calibration decides: name -> ``Encoded``.

    Covers every Linear weight left to the budget (``plans[n] is None``: bits allocated from
    ``candidates`` so their average is at most ``target_bpw``) or planned with a codec that accepts
    calibration; other budgeted 2-D tensors (embedding tables) are ``int8``. GPTQ sees the first
    ``max_tokens`` tokens of ``text`` (None: :func:`default_tokens`), the bit
    allocation the first ``damage_tokens``; ``encode`` as in :func:`sequential_encode`. With
    ``smoothing`` (where :func:`smoothing_pays`), scales are first folded from norms into the
    Linears calibration encodes (``compression.smoothing``) and the changed norms are among the
    encodings.
    ``ValueError`` when the budget cannot be met.
    """
    from tqdm.auto import tqdm

    from ..registry import get_codec

    model, factory = source_model(source)
    linears = [n for n in names if n in factory.linears and n not in factory.embeddings]
    codecs = {n: get_codec(plans[n]) for n in linears if plans[n] is not None and takes_calibration(get_codec(plans[n]))}
    budgeted = [n for n in linears if plans[n] is None]
    settings = [get_codec(c) for c in candidates] if budgeted else []
    if max_tokens is None:
        weights = sum(int(np.prod(factory.linears[n][0].weight.shape)) for n in linears)
        max_tokens = default_tokens(model, weights, [*codecs.values(), *settings])
    data = batches(model, text, max_tokens, window=LM_WINDOW, batch=2048 // LM_WINDOW)
    out: dict[str, Any] = {}
    encoded = [n for n in linears if n in codecs or n in budgeted]
    if smoothing and smoothing_pays(factory, codecs, target_bpw if budgeted else None):
        out.update(_smoothed(model, factory, data, encoded, plans))
    for n in names:
        if plans[n] is None and n not in linears:
            out[n] = get_codec({"id": "int8"}).encode(source.load(n), source=n)
    if budgeted:
        damage_data = batches(model, text, min(damage_tokens, max_tokens), window=256, batch=2)
        probe_tokens = min(PROBE_TOKENS[model_kind(model)], max_tokens)
        try:
            pick = allocate_settings(model, factory, damage_data, budgeted, settings, target_bpw, jobs=jobs,
                                     grams=_probe_grams(model, factory, text, probe_tokens, budgeted))
        except ValueError as exc:
            names = ", ".join(f"{c.get('id')} {c['bits']}-bit" if "bits" in c else str(c.get("id")) for c in candidates)
            raise ValueError(f"no setting of [{names}] reaches {target_bpw} bits/weight "
                             f"over the Linear weights ({exc})") from None
        codecs.update(pick)
    bar = tqdm(total=len(codecs), unit="tensor", disable=not progress, desc="rbe calibrate", dynamic_ncols=True)
    try:
        out.update(sequential_encode(model, factory, data, codecs, jobs=jobs,
                                     on_encoded=lambda n, e: bar.update(1), encode=encode))
    finally:
        bar.close()
    return out
