"""Building the torch model of an .rbe file's description, and giving it a native engine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..abc import Backend, Encoded
from ..errors import NativeUnavailableError
from .bert import BertEncoder
from .common import CausalLM, LayerFactory, RBEModel
from .decoder import DECODER_MODELS
from .families import read_description
from .gpt2 import GPT2LMHead
from .spec import check_engine

#: architecture name -> the torch module class that runs it.
MODEL_CLASSES: dict[str, type[RBEModel]] = {
    c.spec.name: c for c in (BertEncoder, GPT2LMHead, *DECODER_MODELS.values())}


def build_model(metadata: Mapping[str, Any], tensors: Mapping[str, Encoded], backend: Backend | None = None,
                *, dense: bool = False) -> RBEModel:
    """The torch model described by .rbe ``metadata`` over ``tensors`` (checked against the config first)."""
    spec, cfg, keep, tokenizer = read_description(metadata, {n: tuple(t.shape) for n, t in tensors.items()})
    model = MODEL_CLASSES[spec.name](cfg, LayerFactory({n: tensors[n] for n in keep}, backend, dense), tokenizer)
    return model.eval()


def attach_native(model: RBEModel, tensors: Mapping[str, Encoded], backend: Backend, engine: str = "auto") -> str:
    """Give a causal LM ``backend``'s native engine (``engine`` 'auto' or 'native'; 'torch' keeps
    the torch modules). Returns why it was not attached ('' when it was); 'native' raises instead."""
    check_engine(engine)
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
