"""Calibrated conversion: run the model on text, allocate bits per tensor, GPTQ layer by layer.

``compress_model`` uses this when calibration is on (a ``--target-bpw`` budget, or a codec that
accepts calibration). The source is built as rbe's own dense fp32 model and run on calibration text:

1. **Sensitivity** (only under a bit budget): one forward + backward pass records, for every
   weight ``W`` of a Linear layer, the mean squared input per input feature ``d`` and the mean
   squared loss gradient per output feature ``f`` (next-token cross-entropy for causal LMs; a
   random projection of the sentence embedding for encoders, whose expected square is the
   embedding Jacobian's). Each candidate codec setting is encoded without calibration, and its loss proxy is
   ``Σ_jk f_j ΔW_jk² d_k`` (a diagonal Fisher / Hessian estimate).
2. **Allocation**: every tensor starts at its cheapest setting; upgrades are taken greedily by
   loss-proxy reduction per stored bit while the bits of all budgeted tensors (everything stored
   counted) stay within ``target × weights``.
3. **Layer-sequential encoding**: the blocks are processed in order on cached hidden states, and
   inside a block stage by stage (Linears that read the same tensor, e.g. q/k/v, form a stage), so
   every Linear is calibrated on the inputs it sees *after* all earlier Linears were compressed
   (GPTQ's "true sequential" order). Each stage's Gram matrix ``Σ xᵀx`` goes to codecs that accept
   calibration (``accepts_calibration``); the decoded weights replace the float ones before the
   next stage runs.

The default calibration text (``rbe_core/data/calibration.txt``) is CPython standard-library
docstrings (PSF License); see ``rbe_core/data/SOURCE.txt``. The whole fp32 model is held in memory.
"""

from __future__ import annotations

import heapq
import os
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import numpy as np

DEFAULT_TEXT = Path(__file__).parent / "data" / "calibration.txt"


@attrs.frozen(eq=False)
class Gram:
    """Input statistics of one Linear layer: ``xtx = Σ xᵀx`` (float64, in × in) over ``count`` rows."""

    xtx: np.ndarray
    count: int

    @property
    def hessian(self) -> np.ndarray:
        """``XᵀX / n``: the layer-output Hessian GPTQ minimises against."""
        return self.xtx / max(1, self.count)


def read_text(calibration: str | os.PathLike | None) -> str:
    """The calibration text: the file ``calibration``, or the built-in default when None."""
    path = DEFAULT_TEXT if calibration is None else Path(calibration)
    from .models.common import ModelError

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
    from .models.common import LayerFactory, load_tokenizer
    from .registry import get_codec

    class Recorder(LayerFactory):
        """A dense factory that remembers which tensors became Linear layers and embeddings."""

        def __init__(self, encoded):
            super().__init__(encoded, dense=True)
            self.linears: dict[str, tuple[Any, bool]] = {}
            self.embeddings: set[str] = set()

        def linear(self, weight, bias=None, *, transposed=False):
            layer = super().linear(weight, bias, transposed=transposed)
            self.linears[weight] = (layer, transposed)
            return layer

        def embedding(self, name):
            self.embeddings.add(name)
            return super().embedding(name)

    raw = get_codec("raw")
    names = source.spec.check(source.config, source.shapes)
    tensors = tensors or {}
    encoded = {n: raw.encode(tensors[n] if n in tensors else source.load(n), source=n) for n in names}
    factory = Recorder(encoded)
    model = source.spec.model_class()(source.config, factory, load_tokenizer(source.tokenizer_json)).eval()
    factory.tensors = {}  # the model holds its own copies now
    for p in model.parameters():
        p.requires_grad_(False)
    return model, factory


def batches(model, text: str, max_tokens: int = 4096, window: int = 512, batch: int = 4) -> list[tuple[tuple, Any]]:
    """Model inputs from ``text``: ``[(args, token mask or None)]``, about ``max_tokens`` tokens in all.

    Causal LMs get windows of ``window`` tokens (the model's own tokenizer; seeded random ids when the
    model has none); encoders get padded batches of the text's sentences.
    """
    import torch

    from .models.common import CausalLM

    tok = model.tokenizer
    if isinstance(model, CausalLM):
        window = max(2, min(window, model.context_length))
        if tok is not None:
            ids = tok.encode(text).ids[:max_tokens]
        else:
            ids = np.random.default_rng(0).integers(0, model.config["vocab_size"], max_tokens).tolist()
        rows = [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)] or [ids]
        return [((torch.tensor(rows[i : i + batch]),), None) for i in range(0, len(rows), batch)]
    sents, out, used = sentences(text), [], 0
    if tok is None or not sents:
        vocab = model.config["vocab_size"]
        gen = torch.Generator().manual_seed(0)
        return [((torch.randint(0, vocab, (batch, 64), generator=gen),), None)
                for _ in range(max(1, max_tokens // (64 * batch)))]
    lengths = [len(tok.encode(s).ids) for s in sents]
    chosen = []
    for s, n in zip(sents, lengths, strict=True):  # text order, about max_tokens tokens
        if used >= max_tokens:
            break
        chosen.append((n, s))
        used += n
    chosen = [s for _n, s in sorted(chosen)]  # similar lengths together: little padding
    for i in range(0, len(chosen), 2 * batch):
        enc = tok.encode_batch(chosen[i : i + 2 * batch])
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc])
        out.append(((ids, mask, torch.tensor([e.type_ids for e in enc])), mask.reshape(-1).bool()))
    return out


def _blocks(model):
    import torch

    lists = [m for m in model.children() if isinstance(m, torch.nn.ModuleList)]
    return lists[0] if lists else []


def sensitivity(model, factory, data) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per Linear weight: (mean squared loss gradient per output, mean squared input per input)."""
    import torch
    import torch.nn.functional as F

    from .models.common import CausalLM

    names = {id(layer): n for n, (layer, _t) in factory.linears.items() if n not in factory.embeddings}
    grads: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}

    def rows(t):
        t = t.detach().reshape(-1, t.shape[-1]).double()
        return t if state.get("mask") is None else t[state["mask"]]

    def pre(mod, args):
        n = names[id(mod)]
        inputs[n] = inputs.get(n, 0) + rows(args[0]).square().sum(0)

    def back(mod, grad_in, grad_out):
        n = names[id(mod)]
        grads[n] = grads.get(n, 0) + rows(grad_out[0]).square().sum(0)

    blocks = _blocks(model)
    hooks = [m.register_forward_pre_hook(pre) for n, (m, _t) in factory.linears.items() if id(m) in names]
    hooks += [m.register_full_backward_hook(back) for n, (m, _t) in factory.linears.items() if id(m) in names]
    if len(blocks):
        hooks.append(blocks[0].register_forward_pre_hook(lambda mod, args: (args[0].requires_grad_(True), *args[1:])))
    gen = torch.Generator().manual_seed(0)
    count = 0
    try:
        for args, mask in data:
            state["mask"] = mask
            with torch.enable_grad():
                out = model(*args)
                if isinstance(model, CausalLM):
                    logits = out[0][:, :-1]
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), args[0][:, 1:].reshape(-1),
                                           reduction="sum")
                else:  # the sentence embedding (masked mean, normalised when the model does) · random r
                    m = torch.ones(out.shape[:2]) if mask is None else mask.reshape(out.shape[:2]).float()
                    pooled = (out * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
                    if model.config.get("normalize"):
                        pooled = F.normalize(pooled, dim=-1)
                    loss = (pooled * torch.randn(pooled.shape, generator=gen)).sum()
                loss.backward()
            count += int(args[0].numel() if mask is None else mask.sum())
    finally:
        for h in hooks:
            h.remove()
    return {n: ((grads[n] / count).numpy(), (inputs[n] / count).numpy()) for n in inputs if n in grads}


def loss_proxy(delta: np.ndarray, f: np.ndarray, d: np.ndarray, transposed: bool) -> float:
    """``Σ_jk f_j ΔW_jk² d_k`` for a stored matrix ``delta`` (transposed: stored as (in, out))."""
    sq = np.square(delta.astype(np.float64))
    return float(d @ sq @ f) if transposed else float(f @ sq @ d)


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


def _accepts(codec) -> bool:
    return bool(getattr(codec, "accepts_calibration", False))


def sequential_encode(model, factory, data, codecs: Mapping[str, Any], *, jobs: int = 1,
                      on_encoded: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """Encode every weight in ``codecs`` (name -> codec) that is a Linear of ``model``, layer-sequentially.

    Returns name -> ``Encoded``; each decoded weight is written back into the model before the next
    stage, so later Grams see the compressed earlier layers. Transposed weights (GPT-2's Conv1D)
    get no calibration (their stored rows are inputs, which GPTQ cannot order).
    """
    import torch

    todo = {id(layer): n for n, (layer, _t) in factory.linears.items() if n in codecs}
    out: dict[str, Any] = {}
    pool = ThreadPoolExecutor(max(1, jobs))

    def encode_stage(stage: list[str], gram: Gram | None):
        def one(n):
            layer, transposed = factory.linears[n]
            codec = codecs[n]
            w = layer.weight.detach().numpy()
            w = np.ascontiguousarray(w.T if transposed else w)
            calib = gram if (gram is not None and not transposed and _accepts(codec)) else None
            return n, codec.encode(w, calibration=calib, source=n)

        for n, enc in pool.map(one, stage):
            layer, transposed = factory.linears[n]
            dec = torch.from_numpy(np.ascontiguousarray(enc.decode(), dtype=np.float32))
            with torch.no_grad():
                layer.weight.copy_(dec.T if transposed else dec)
            out[n] = enc
            if on_encoded is not None:
                on_encoded(n, enc)

    def run_stages(modules: list, run: Callable, nbatches: int) -> set[int]:
        """Stage by stage over ``modules``; returns the ids of those the forward pass never reached."""
        remaining = {id(m) for m in modules if id(m) in todo}
        while remaining:
            state: dict[str, Any] = {"stage": [], "key": None, "fixed": False, "xtx": None, "count": 0, "mask": None}

            def hook(mod, args, state=state, remaining=remaining):
                if id(mod) not in remaining:
                    return
                x, n = args[0], todo[id(mod)]
                if not state["fixed"]:
                    key = (x.data_ptr(), tuple(x.shape))
                    if state["key"] is not None and key != state["key"]:
                        raise _Stop
                    state["key"] = key
                    if n in state["stage"]:
                        return
                    state["stage"].append(n)
                elif n not in state["stage"]:
                    raise _Stop
                if n == state["stage"][0]:
                    rows = x.detach().reshape(-1, x.shape[-1])
                    rows = (rows if state["mask"] is None else rows[state["mask"]]).float()
                    g = (rows.T @ rows).double()
                    state["xtx"] = g if state["xtx"] is None else state["xtx"] + g
                    state["count"] += rows.shape[0]

            hooks = [m.register_forward_pre_hook(hook) for m in modules if id(m) in remaining]
            try:
                for b in range(nbatches):
                    try:
                        run(b, state)
                    except _Stop:
                        pass
                    state["fixed"] = True
            finally:
                for h in hooks:
                    h.remove()
            if not state["stage"]:
                break
            encode_stage(state["stage"], Gram(state["xtx"].numpy(), state["count"]))
            remaining -= {id(factory.linears[n][0]) for n in state["stage"]}
        return remaining

    masks = [m for _a, m in data]
    try:
        with torch.no_grad():
            blocks = _blocks(model)
            cached: list[tuple[tuple, dict]] = []

            def grab(mod, args, kwargs):
                cached.append((args, kwargs))
                raise _Stop

            if len(blocks):
                h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
                try:
                    for args, _mask in data:
                        try:
                            model(*args)
                        except _Stop:
                            pass
                finally:
                    h.remove()
            for block in blocks:
                def run_block(b, state, block=block):
                    state["mask"] = masks[b]
                    args, kwargs = cached[b]
                    block(*args, **kwargs)

                run_stages([m for m in block.modules() if id(m) in todo], run_block, len(cached))
                for b, (args, kwargs) in enumerate(cached):
                    y = block(*args, **kwargs)
                    cached[b] = ((y[0] if isinstance(y, tuple) else y, *args[1:]), kwargs)

            def run_model(b, state):
                state["mask"] = masks[b]
                model(*data[b][0])

            tail = [m for m in model.modules() if id(m) in todo and todo[id(m)] not in out]
            for i in run_stages(tail, run_model, len(data)):
                encode_stage([todo[i]], None)
    finally:
        pool.shutdown()
    return out


def calibrated_encodings(source, names: list[str], plans: Mapping[str, Any], target_bpw: float | None, text: str,
                         candidates: list[dict[str, Any]], *, jobs: int = 1, progress: bool = False,
                         max_tokens: int = 4096) -> dict[str, Any]:
    """Encodings for the tensors calibration decides: name -> ``Encoded``.

    Covers every Linear weight left to the budget (``plans[n] is None``: bits allocated from
    ``candidates`` so their average is at most ``target_bpw``) or planned with a codec that accepts
    calibration; other budgeted 2-D tensors (embedding tables) are ``int8``. ``ValueError`` when
    the budget cannot be met.
    """
    from tqdm.auto import tqdm

    from .registry import get_codec

    model, factory = source_model(source)
    data = batches(model, text, max_tokens)
    linears = [n for n in names if n in factory.linears and n not in factory.embeddings]
    codecs = {n: get_codec(plans[n]) for n in linears if plans[n] is not None and _accepts(get_codec(plans[n]))}
    out: dict[str, Any] = {}
    for n in names:
        if plans[n] is None and n not in linears:
            out[n] = get_codec({"id": "int8"}).encode(source.load(n), source=n)
    budgeted = [n for n in linears if plans[n] is None]
    if budgeted:
        settings = [get_codec(c) for c in candidates]
        sens = sensitivity(model, factory, data[: max(1, len(data) // 2)])  # a diagonal estimate: half the text
        costs, errors, nbytes = {}, {}, {}
        for n in budgeted:
            layer, transposed = factory.linears[n]
            w = layer.weight.detach().numpy()
            w = np.ascontiguousarray(w.T if transposed else w)
            f, d = sens.get(n, (np.ones(w.shape[1 if transposed else 0]), np.ones(w.shape[0 if transposed else 1])))
            costs[n], errors[n] = [], []
            for i, c in enumerate(settings):
                if _extrapolated(c, settings) is None:
                    enc = c.encode(w, source=n)
                    nbytes[i, w.shape] = enc.nbytes - len(n)  # the header holds the name
                    errors[n].append(loss_proxy(enc.decode().reshape(w.shape) - w, f, d, transposed))
                else:
                    errors[n].append(None)
                if (i, w.shape) not in nbytes:
                    nbytes[i, w.shape] = c.encode(np.zeros_like(w)).nbytes
                costs[n].append(8.0 * (nbytes[i, w.shape] + len(n)))
            for i, c in enumerate(settings):  # uniform-quantizer noise: ×1/4 per extra bit
                if errors[n][i] is None:
                    j = settings.index(_extrapolated(c, settings))
                    errors[n][i] = errors[n][j] * 4.0 ** (settings[j].bits - c.bits)
        weights = sum(int(np.prod(source.shapes[n])) for n in budgeted)
        try:
            pick = allocate(costs, errors, target_bpw * weights)
        except ValueError as exc:
            raise ValueError(f"no setting of {[c.get('id') for c in candidates]} reaches {target_bpw} bits/weight "
                             f"over the Linear weights ({exc})") from None
        codecs.update({n: settings[i] for n, i in pick.items()})
    bar = tqdm(total=len(codecs), unit="tensor", disable=not progress, desc="rbe calibrate", dynamic_ncols=True)
    try:
        out.update(sequential_encode(model, factory, data, codecs, jobs=jobs,
                                     on_encoded=lambda n, e: bar.update(1)))
    finally:
        bar.close()
    return out
