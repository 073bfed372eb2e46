"""Model families (BERT, GPT-2, Llama) built from encoded tensors, and their sources (HF, GGUF)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..abc import Backend, Encoded
from ..errors import NativeUnavailableError
from .bert import BertSpec
from .common import (
    CausalLM,
    LayerFactory,
    ModelError,
    NativePlan,
    RBEModel,
    Spec,
    load_tokenizer,
    model_metadata,
)
from .gpt2 import GPT2Spec, mini_gpt2_config
from .llama import LlamaSpec

SPECS: dict[str, type[Spec]] = {s.name: s for s in (BertSpec, GPT2Spec, LlamaSpec)}


def get_spec(architecture: str) -> type[Spec]:
    """The spec of a supported architecture; ``ModelError`` naming the supported ones otherwise."""
    try:
        return SPECS[architecture]
    except KeyError:
        raise ModelError(f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(SPECS))}") from None


def spec_for_hf(model_type: str | None) -> type[Spec]:
    """The spec whose transformers ``model_type`` is ``model_type``."""
    for spec in SPECS.values():
        if model_type in spec.hf_model_types:
            return spec
    known = sorted(t for s in SPECS.values() for t in s.hf_model_types)
    raise ModelError(f"unsupported architecture (model_type {model_type!r}); supported: {', '.join(known)}")


def build_model(metadata: Mapping[str, Any], tensors: Mapping[str, Encoded], backend: Backend | None = None,
                *, dense: bool = False) -> RBEModel:
    """The torch model described by .rbe ``metadata`` over ``tensors`` (checked against the config first)."""
    info = metadata.get("rbe.model")
    if not isinstance(info, dict) or "architecture" not in info or "config" not in info:
        raise ModelError("this .rbe file holds no model description (metadata 'rbe.model'); "
                         "it was not written by rbe convert")
    spec = get_spec(info["architecture"])
    cfg = info["config"]
    keep = spec.check(cfg, {n: tuple(t.shape) for n, t in tensors.items()})
    tok = metadata.get("rbe.tokenizer")
    tokenizer = load_tokenizer(json.dumps(tok) if tok else None)
    model = spec.model_class()(cfg, LayerFactory({n: tensors[n] for n in keep}, backend, dense), tokenizer)
    return model.eval()


def attach_native(model: RBEModel, tensors: Mapping[str, Encoded], backend: Backend, engine: str = "auto") -> str:
    """Give a causal LM ``backend``'s native engine (``engine`` 'auto' or 'native'; 'torch' keeps
    the torch modules). Returns why it was not attached ('' when it was); 'native' raises instead."""
    if engine not in ("auto", "native", "torch"):
        raise ModelError(f"engine must be auto, native or torch, got {engine!r}")
    if engine == "torch" or not isinstance(model, CausalLM):
        return "torch modules asked for" if engine == "torch" else "not a causal LM"
    try:
        plan = model.spec.native_plan(model.config, set(tensors))
        model.native = backend.native_decoder(plan, tensors)
    except NativeUnavailableError as exc:
        if engine == "native":
            raise
        return str(exc)
    return ""


__all__ = ["SPECS", "CausalLM", "attach_native", "LayerFactory", "ModelError", "NativePlan", "RBEModel", "Spec", "build_model", "get_spec", "load_tokenizer",
           "mini_gpt2_config", "model_metadata", "spec_for_hf"]
