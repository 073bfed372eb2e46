"""Activation smoothing before calibration: per-channel scales moved out of a norm's output into the
Linear weights that read it (SmoothQuant's migration), exact in float.

A norm's output channel j is divided by ``s_j`` (its weight, and bias, divided) and column j of every
Linear that reads that output multiplied by it, so the float model computes the same function while
the weights to quantize carry part of the activations' channel spread:
``s_j = amax|x_j|^ALPHA / amax|W[:, j]|^(1 - ALPHA)`` (over the calibration tokens and the readers'
columns), normalised to a geometric mean of 1. The readers are found by running the model (the
Linears whose input *is* the norm's output tensor); a fold is kept only if the model's output on a
check batch stays within ``TOLERANCE``, so a norm whose output also reaches something else (a
mixture-of-experts' gathered rows, a residual) is left as it was.

Measured (SmolLM2-135M, ``--target-bpw 4.25``, mean KL over five licence texts, docs/quality.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .inputs import real_tokens, run_input

#: SmoothQuant's migration strength.
ALPHA = 0.5
#: Largest change of the check batch's output (× their largest magnitude) a fold may make.
TOLERANCE = 1e-3


def smooth(model, linears: Mapping[str, tuple[Any, bool]], data, *, alpha: float = ALPHA) -> list:
    """Fold smoothing scales into ``model``'s norms and the Linears of ``linears`` (name -> (layer,
    transposed)) that read them, measured on ``data`` (``calibration.batches``); returns the
    parameters changed (norm weights and biases), for the caller to store."""
    import torch

    with torch.no_grad():
        readers, amax = _norm_readers(model, linears, data)
        check = _first_row(data[0][0])
        reference = _output(run_input(model, check))
        changed: list = []
        for norm, layers in readers.items():
            undo = _fold(norm, layers, _scales(amax[norm], layers, alpha))
            if _moved(_output(run_input(model, check)), reference) > TOLERANCE:
                undo()
                continue
            changed += [p for p in (norm.weight, getattr(norm, "bias", None)) if p is not None]
    return changed


def _norm_readers(model, linears: Mapping[str, tuple[Any, bool]], data) -> tuple[dict, dict]:
    """({norm module: [Linear layers reading its output]}, {norm: amax of its output per channel
    over ``data``}): norms are the modules with a 1-D ``weight`` that are not Linears, their readers
    found on the first calibration sequence; Linears stored transposed (rows are inputs) are not
    folded into."""
    import torch

    layers = {id(layer): (layer, transposed) for layer, transposed in linears.values()}
    norms = [m for m in model.modules()
             if id(m) not in layers and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1]
    outputs: dict[int, Any] = {}  # id(output) -> norm; `held` keeps the outputs, so no id is reused
    held: list = []
    readers: dict[Any, list] = {}
    amax: dict[Any, Any] = {}
    state = {"mask": None}

    def find_output(mod, _args, out):
        if isinstance(out, torch.Tensor):
            outputs[id(out)] = mod
            held.append(out)

    def find_reader(mod, args):
        norm = outputs.get(id(args[0]))
        if norm is not None and mod not in readers.setdefault(norm, []):
            readers[norm].append(mod)

    def measure(mod, _args, out):
        if isinstance(out, torch.Tensor):
            rows = real_tokens(out.detach().reshape(-1, out.shape[-1]), state["mask"]).abs().amax(0).float()
            amax[mod] = rows if mod not in amax else torch.maximum(amax[mod], rows)

    hooks = [m.register_forward_hook(find_output) for m in norms]
    hooks += [layer.register_forward_pre_hook(find_reader) for layer, _t in layers.values()]
    try:
        run_input(model, _first_row(data[0][0]))
    finally:
        for h in hooks:
            h.remove()
    held.clear()
    usable = {norm: found for norm, found in readers.items()
              if not any(layers[id(layer)][1] for layer in found) and norm.weight.numel() == found[0].weight.shape[1]}
    hooks = [norm.register_forward_hook(measure) for norm in usable]
    try:
        for args, state["mask"] in data:
            run_input(model, args)
    finally:
        for h in hooks:
            h.remove()
    return usable, amax


def _scales(x_amax, layers: list, alpha: float):
    """``s_j = amax|x_j|^alpha / amax|W[:, j]|^(1 - alpha)`` over the readers, geometric mean 1."""
    import torch

    w_amax = torch.stack([layer.weight.abs().amax(0) for layer in layers]).amax(0).float()
    s = x_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1.0 - alpha)
    return s / s.log().mean().exp()


def _fold(norm, layers: list, s):
    """Divide the norm's output by ``s`` (its scale ``offset + weight``, and its bias), multiply the
    readers' columns by it; returns a function that restores all of them."""
    saved = [(p, p.detach().clone()) for p in (norm.weight, getattr(norm, "bias", None), *[m.weight for m in layers])
             if p is not None]
    offset = float(getattr(norm, "offset", 0.0))
    norm.weight.copy_((offset + norm.weight.float()) / s - offset)
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_(norm.bias.float() / s)
    for layer in layers:
        layer.weight.mul_(s.to(layer.weight.dtype))

    def undo():
        for p, value in saved:
            p.copy_(value)

    return undo


def _first_row(args):
    """One calibration input cut to its first sequence (positional tensors, or keyword tensors)."""
    if isinstance(args, Mapping):
        return {k: v[:1] if hasattr(v, "shape") and v.dim() else v for k, v in args.items()}
    return tuple(a[:1] if hasattr(a, "shape") and a.dim() else a for a in args)


def _output(out):
    """A model's output tensor: logits (causal LMs), the last hidden states (encoders) or the first
    of a tuple."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name).float()
    return (out[0] if isinstance(out, tuple) else out).float()


def _moved(now, reference) -> float:
    return float((now - reference).abs().max() / reference.abs().max().clamp(min=1e-12))
