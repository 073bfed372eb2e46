"""The architectures rbe runs, as descriptions (``Spec``): names, shapes, configs, native plans."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..spec import ModelError, Spec, load_tokenizer
from .bert import BertSpec
from .decoder import DECODER_SPECS, GGUF_ARCHS
from .gpt2 import GPT2Spec, mini_gpt2_config

SPECS: dict[str, type[Spec]] = {s.name: s for s in (BertSpec, GPT2Spec, *DECODER_SPECS.values())}
LlamaSpec = DECODER_SPECS["llama"]


def get_spec(architecture: str) -> type[Spec]:
    """The spec of a supported architecture; ``ModelError`` naming the supported ones otherwise."""
    try:
        return SPECS[architecture]
    except KeyError:
        raise ModelError(f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(SPECS))}") from None


def spec_for_gguf(architecture: str) -> type[Spec]:
    """The spec of a GGUF ``general.architecture``; ``ModelError`` naming the supported ones otherwise."""
    if architecture not in GGUF_ARCHS:
        raise ModelError(f"GGUF architecture {architecture!r} is not supported; supported: {', '.join(sorted(GGUF_ARCHS))}")
    return SPECS[GGUF_ARCHS[architecture]]


def spec_for_hf(model_type: str | None) -> type[Spec]:
    """The spec whose transformers ``model_type`` is ``model_type``."""
    for spec in SPECS.values():
        if model_type in spec.hf_model_types:
            return spec
    known = sorted(t for s in SPECS.values() for t in s.hf_model_types)
    raise ModelError(f"unsupported architecture (model_type {model_type!r}); supported: {', '.join(known)}")


def read_description(metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]):
    """(spec, config, names of the tensors the model uses, tokenizer or None) of the model an
    .rbe file's ``metadata`` describes, checked against the file's tensor ``shapes``."""
    info = metadata.get("rbe.model")
    if not isinstance(info, dict) or "architecture" not in info or "config" not in info:
        raise ModelError("this .rbe file holds no model description (metadata 'rbe.model'); "
                         "it was not written by rbe convert")
    spec = get_spec(info["architecture"])
    cfg = info["config"]
    keep = spec.check(cfg, shapes)
    tok = metadata.get("rbe.tokenizer")
    return spec, cfg, keep, load_tokenizer(json.dumps(tok) if tok else None)


__all__ = ["read_description", "SPECS", "BertSpec", "GPT2Spec", "LlamaSpec", "get_spec", "mini_gpt2_config", "spec_for_gguf",
           "spec_for_hf"]
