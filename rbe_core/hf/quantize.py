"""In-place compression of any torch model: ``quantize(model, codec=...)`` and ``dequantize(model)``.

Every matching ``nn.Linear`` (and HF GPT-2 ``Conv1D``) becomes a ``QuantizedLinear``. No
architecture code: with ``calibration`` the layer-sequential GPTQ path of ``rbe convert`` runs on
the module tree through forward hooks (``rbe_core.compression.calibration.sequential_encode``).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..abc import Codec, Encoded
from ..layers import set_module
from ..registry import get_backend, get_codec
from .layers import QuantizedLinear

log = logging.getLogger("rbe.hf")

#: Calibration windows (tokens) for causal LMs given text.
WINDOW = 256
#: Tokens the bit allocation measures each layer's output damage on (``rbe convert``: 256).
DAMAGE_TOKENS = 256


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _as_patterns(value: str | Iterable[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _head_names(model: nn.Module) -> set[str]:
    """Names of the output head (``get_output_embeddings()``) and of Linears whose weight is an input embedding's."""
    out = set()
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    embedding_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, m in model.named_modules():
        if m is head and head is not None:
            out.add(name)
        elif isinstance(m, nn.Linear) and m.weight.data_ptr() in embedding_ptrs:
            out.add(name)
    return out


def select_modules(model: nn.Module, include=None, exclude=None) -> dict[str, nn.Module]:
    """The Linear/Conv1D modules ``quantize`` replaces: name -> module.

    ``include``/``exclude`` are module-name globs (a bare name also matches as ``*.name``, e.g.
    ``"q_proj"``). The output head and Linears sharing an input embedding's weight are left out
    unless ``include`` names them; a head tied to the embedding cannot be included (``ValueError``).
    """
    inc, exc = _as_patterns(include), _as_patterns(exclude)

    def matches(name: str, patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)

    heads = _head_names(model)
    embedding_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen = {}
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) or _is_conv1d(m)) or isinstance(m, QuantizedLinear):
            continue
        if (inc and not matches(name, inc)) or matches(name, exc):
            continue
        if name in heads:
            if not (inc and matches(name, inc)):
                continue
            if m.weight.data_ptr() in embedding_ptrs:
                raise ValueError(f"{name} shares its weight with the input embedding (tied); untie it "
                                 "(tie_word_embeddings=False) or leave it out")
        chosen[name] = m
    return chosen


def _dense(module: nn.Module) -> np.ndarray:
    """The module's weight as an (out, in) float32 array."""
    w = module.weight.detach().float().cpu()
    return np.ascontiguousarray((w.T if _is_conv1d(module) else w).numpy())


def _as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same as a ``Conv1D`` (so calibration hooks see one kind of layer)."""
    w = module.weight.detach()
    out = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w.T)
        if module.bias is not None:
            out.bias.copy_(module.bias)
    return out


def _calibration_data(model: nn.Module, calibration, tokenizer, max_tokens: int) -> list[tuple[Any, Any]]:
    """``[(model inputs, token mask or None)]`` from text (needs a tokenizer), token-id tensors, or
    dicts of model inputs. Causal LMs get windows of ``WINDOW`` tokens; dict inputs keep their
    ``attention_mask`` as the mask. ``use_cache=False`` is passed where the model takes it."""
    from ..compression.calibration import is_causal, sentences

    kw = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    if isinstance(calibration, (str, bytes)):
        if tokenizer is None:
            raise ValueError("calibration text needs a tokenizer (quantize(..., tokenizer=...))")
        text = calibration.decode() if isinstance(calibration, bytes) else calibration
        if is_causal(model):
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
            window = min(WINDOW, max(2, ids.numel()))
            rows = [ids[i:i + window] for i in range(0, ids.numel() - window + 1, window)]
            wanted = max(1, min(len(rows), max_tokens // window))
            rows = [rows[i] for i in np.linspace(0, len(rows) - 1, wanted).round().astype(int)]
            return [({"input_ids": torch.stack(rows[i:i + 4]), **kw}, None) for i in range(0, len(rows), 4)]
        sents, out, used = sentences(text), [], 0
        for i in range(0, len(sents), 16):
            if used >= max_tokens:
                break
            enc = tokenizer(sents[i:i + 16], return_tensors="pt", padding=True, truncation=True, max_length=256)
            used += int(enc["attention_mask"].sum())
            out.append(({**enc, **kw}, enc["attention_mask"].reshape(-1).bool()))
        return out
    out = []
    for item in calibration:
        if isinstance(item, Mapping):
            mask = item.get("attention_mask")
            out.append(({**item, **kw}, None if mask is None else torch.as_tensor(mask).reshape(-1).bool()))
        else:
            ids = torch.as_tensor(item)
            out.append(({"input_ids": ids if ids.dim() == 2 else ids[None], **kw}, None))
    if not out:
        raise ValueError("calibration is empty")
    return out


def _first_window(data: list[tuple[Any, Any]], tokens: int = DAMAGE_TOKENS) -> list[tuple[Any, Any]]:
    """The damage measurement's data: the first input's first row, cut to ``tokens`` tokens (as ``rbe
    convert`` measures damage on 256 tokens: each of the N layers costs a forward pass)."""
    inputs, mask = data[0]
    cut = {k: (v[:1, :tokens] if isinstance(v, torch.Tensor) and v.dim() >= 2 and k != "pixel_values"
               else v[:1] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    if mask is not None:
        width = inputs["attention_mask"].shape[1] if "attention_mask" in inputs else mask.numel()
        mask = mask.reshape(-1, width)[:1, :tokens].reshape(-1)
    return [(cut, mask)]


def _codecs(codec) -> list[Codec]:
    if isinstance(codec, Codec):
        return [codec]
    return [get_codec(codec if codec is not None else "int8")]


def _budgeted(weights: Mapping[str, np.ndarray], settings: list[Codec], target_bpw: float) -> dict[str, Encoded]:
    """Round-to-nearest encodings among ``settings`` (best first) whose stored bits average at most
    ``target_bpw`` (largest tensors first get the best setting that keeps the running average
    within the budget)."""
    total = sum(w.size for w in weights.values())
    spent, left = 0.0, total
    out = {}
    for name in sorted(weights, key=lambda n: -weights[n].size):
        w = weights[name]
        left -= w.size
        zero_row = np.zeros((1, w.shape[1]), np.float32)
        cheapest = min(8.0 * c.encode(zero_row).nbytes for c in settings) / w.shape[1]
        smallest = None
        for c in settings:
            enc = c.encode(w, source=name)
            # what remains must still fit at (about) the cheapest setting's rate
            if spent + 8.0 * enc.nbytes + cheapest * left <= target_bpw * total:
                break
            smallest = enc if smallest is None or enc.nbytes < smallest.nbytes else smallest
        else:
            enc = smallest
        if spent + 8.0 * enc.nbytes > target_bpw * total + 1e-6:
            raise ValueError(f"no setting of {settings[0].codec_id} reaches {target_bpw} bits/weight")
        spent += 8.0 * enc.nbytes
        out[name] = enc
    return out


def quantize(model: nn.Module, codec: str | Mapping[str, Any] | Codec | None = None, *,
             target_bpw: float | None = None, calibration=None, include=None, exclude=None,
             backend: str | None = None, tokenizer=None, calibration_tokens: int | None = None,
             asymmetric: bool = True, smoothing: bool = True, progress: bool = False) -> nn.Module:
    """Compress ``model``'s Linear (and Conv1D) weights in place; returns ``model``.

    ``codec``: an rbe codec id, config or instance (default ``int8``); with ``target_bpw`` the bits
    are chosen per layer among ``codec``'s ``bit_settings()`` (default: as ``rbe convert``'s, the
    flagship's for causal LMs and trellis codes' for encoders) so the replaced weights average at
    most that many stored bits. ``calibration``: text (with ``tokenizer``), token-id tensors, or
    dicts of model inputs (``calibration_tokens`` of them; None: ``calibration.default_tokens``);
    then the weights are encoded
    layer-sequentially on the inputs each layer sees (GPTQ for codecs that take calibration, and
    bits allocated by measured output damage under ``target_bpw``); ``asymmetric``: each weight is
    first moved to the one that best reproduces the float layer from the compressed model's inputs
    (``calibration.asymmetric_target``), else GPTQ only rounds it; ``smoothing``: per-channel scales
    are first folded from norms into the layers that read them where the weights keep enough bits
    (``calibration.smoothing_pays``; as ``rbe convert``). ``include``/``exclude``: module
    globs (see ``select_modules``). ``backend``: the rbe backend the layers run on (default: the
    best available). On a ``transformers`` model it also sets ``model.config.quantization_config``
    (an ``RbeConfig`` with every layer's codec), so ``save_pretrained`` writes the codes and
    ``model.dequantize()`` works.
    """
    from ..compression.calibration import (
        default_tokens,
        encode_calibrated,
        is_causal,
        sequential_encode,
        smoothing_pays,
        takes_calibration,
    )
    from ..compression.convert import budget_candidates

    if target_bpw is not None and not (target_bpw > 0 and math.isfinite(target_bpw)):
        raise ValueError(f"target bits/weight must be a positive number, got {target_bpw}")
    backend_obj = get_backend(backend)
    base = _codecs(codec)[0] if target_bpw is None else None
    settings = [base] if base is not None else [get_codec(c) for c in budget_candidates(codec, causal=is_causal(model))]
    targets = select_modules(model, include, exclude)
    if not targets:
        raise ValueError("no nn.Linear or Conv1D module matches; nothing to quantize")
    conv1d = {n for n, m in targets.items() if _is_conv1d(m)}
    for n in conv1d:
        targets[n] = _as_linear(targets[n])
        set_module(model, n, targets[n])
    for n, m in targets.items():
        if not torch.isfinite(m.weight).all():
            raise ValueError(f"{n}: the weight holds NaN or inf")
    was_training = model.training
    model.eval()
    encoded: dict[str, Encoded] = {}
    if calibration is not None:
        from ..compression.calibration import allocate_settings

        if calibration_tokens is None:
            weights = sum(m.weight.numel() for m in targets.values())
            calibration_tokens = default_tokens(model, weights, settings)
        data = _calibration_data(model, calibration, tokenizer, calibration_tokens)
        factory = SimpleNamespace(linears={n: (m, False) for n, m in targets.items()}, embeddings=set())
        dtypes = {n: m.weight.dtype for n, m in targets.items()}
        for m in targets.values():  # calibration runs in float32, like the encoders
            m.float()
        if smoothing and smoothing_pays(factory, {} if base is None else dict.fromkeys(targets, base), target_bpw):
            from ..compression.smoothing import smooth

            smooth(model, factory.linears, data)
        if target_bpw is not None:
            codecs = allocate_settings(model, factory, _first_window(data), list(targets), settings, target_bpw)
        else:
            codecs = {n: base for n in targets}
        calibrated = {n: c for n, c in codecs.items() if takes_calibration(c)}
        encoded = sequential_encode(model, factory, data, calibrated, asymmetric=asymmetric)
        for n, c in codecs.items():
            if n not in encoded:
                encoded[n] = encode_calibrated(c, _dense(targets[n]), None, n)
        for n, m in targets.items():
            m.to(dtypes[n])
    elif target_bpw is not None:
        encoded = _budgeted({n: _dense(m) for n, m in targets.items()}, settings, target_bpw)
    else:
        for n, m in targets.items():
            encoded[n] = base.encode(_dense(m), source=n)
    for n, m in targets.items():
        bias = None if m.bias is None else m.bias.detach().float().cpu()
        set_module(model, n, QuantizedLinear(encoded[n], bias, backend_obj, conv1d=n in conv1d))
    model.train(was_training)
    record(model, codec, target_bpw, backend, include, exclude)
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def record(model: nn.Module, codec, target_bpw, backend, include, exclude) -> None:
    """Attach an ``RbeConfig`` describing every quantized layer (transformers models only), and an
    ``RbeHfQuantizer`` unless the model has one (made by transformers' ``AutoHfQuantizer`` from the
    registry ``rbe_core.hf.quantizer.register`` fills, which ``import rbe_core`` sees to)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    from transformers.quantizers.auto import AutoHfQuantizer

    from .config import RbeConfig

    codec_conf = codec.get_config() if isinstance(codec, Codec) else codec
    existing = getattr(config, "quantization_config", None)
    rc = existing if isinstance(existing, RbeConfig) else RbeConfig(
        codec=codec_conf, target_bpw=target_bpw, backend=backend,
        include=_as_patterns(include) or None, exclude=_as_patterns(exclude) or None)
    rc.modules = {n: m.entry() for n, m in quantized_modules(model).items()}
    config.quantization_config = rc
    if getattr(model, "hf_quantizer", None) is None:
        model.hf_quantizer = AutoHfQuantizer.from_config(rc, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = "rbe"


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every ``QuantizedLinear`` by the plain module it decodes to (bit for bit); returns ``model``."""
    for n, m in quantized_modules(model).items():
        set_module(model, n, m.dequantize())
    return model


def footprint(model: nn.Module) -> dict[str, float]:
    """Stored bytes of the quantized layers' codes and their bits per weight (payloads only)."""
    layers = quantized_modules(model).values()
    nbytes = sum(m.encoded.payload_nbytes for m in layers)
    weights = sum(m.encoded.numel for m in layers)
    return {"layers": len(layers), "weights": weights, "bytes": nbytes, "bits_per_weight": 8.0 * nbytes / max(1, weights)}
