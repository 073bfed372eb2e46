"""What describes a model without running it: the architecture ``Spec`` interface, the native
engine's ``NativePlan``, model errors, tokenizers and the .rbe model metadata. No torch.

An architecture (``rbe_core.models.families``) provides a ``Spec`` subclass that knows: the
normalised config built from a source config (``from_hf_config``), the tensors that config needs
with their shapes (``expected``), how a native engine runs it (``native_plan``) and how to write a
standard HF checkpoint (``hf_config``, ``to_hf``). Normalised configs are plain JSON and travel
inside the .rbe metadata under ``"rbe.model"``, next to the tokenizer JSON. The torch modules that
run each architecture live beside this (``rbe_core.models.bert``, ``gpt2``, ``decoder``).
"""

from __future__ import annotations

import abc
import fnmatch
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import numpy as np

from ..errors import NativeUnavailableError, RBEError


class ModelError(RBEError, ValueError):
    """A model cannot be built or run as asked (missing tensor, config mismatch, unsupported
    architecture, prompt longer than the context)."""


@attrs.frozen
class NativePlan:
    """What a native engine needs to run a causal LM without the torch modules.

    ``arch``: 'decoder' (``families.decoder``) or 'gpt2'. ``config``: n_layers, hidden,
    intermediate, n_heads, n_kv_heads, head_dim, vocab, max_ctx, eps, rope_theta, rope_style
    ('none' | 'half' | 'interleaved'), activation ('silu_gated' | 'gelu_tanh_gated' | 'gelu_tanh'
    | 'gelu' | 'relu'), and for a decoder the settings of ``families.decoder.engine_config``.
    ``matrices``: (layer or -1, slot, weight name, bias name or None, transposed) with slots q k v
    o qkv gate up down gate_up router ``expert_gate.E`` ``expert_up.E`` ``expert_down.E`` per
    layer and embed pos head globally (no head: tied to the embedding). ``vectors``: (layer or
    -1, slot, name) with attn_norm attn_post_norm ffn_norm ffn_post_norm q_norm k_norm (decoder)
    or norm1 norm1_b norm2 norm2_b (gpt2) per layer and final final_b globally.
    """

    arch: str
    config: dict
    matrices: tuple
    vectors: tuple


class Spec(abc.ABC):
    """One architecture family. Subclasses set ``name`` and implement the class methods."""

    name: ClassVar[str]
    hf_model_types: ClassVar[tuple[str, ...]] = ()
    #: whether the family generates text (a causal LM) or embeds it (an encoder).
    causal: ClassVar[bool] = True
    #: source tensors that are not weights (buffers, position ids): skipped when converting.
    ignored: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abc.abstractmethod
    def from_hf_config(cls, hf: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
        """rbe's model config from a HF ``config.json`` and the source's tensor names."""

    @classmethod
    @abc.abstractmethod
    def expected(cls, cfg: Mapping[str, Any]) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """(required, optional) tensor name -> shape, in the source's own names and layouts."""

    @classmethod
    def hf_config(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """A transformers ``config.json`` for this model."""
        return dict(cfg["hf_config"])

    @classmethod
    def to_hf(cls, cfg: Mapping[str, Any], name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
        """The HF checkpoint name and layout of source tensor ``name`` (identity for HF sources)."""
        return name, array

    @classmethod
    def native_plan(cls, cfg: Mapping[str, Any], names: set[str]) -> NativePlan:
        """How a native engine runs this model (``names``: the tensors present)."""
        raise NativeUnavailableError(f"{cls.name} models have no native engine plan")

    @classmethod
    def check(cls, cfg: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
        """Validate ``shapes`` (all source tensors) against the config; return the names to keep.

        Raises ``ModelError`` naming missing tensors, shape mismatches and unexpected tensors.
        """
        required, optional = cls.expected(cfg)
        problems = []
        missing = [n for n in required if n not in shapes]
        if missing:
            problems.append(f"missing tensor(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        for name, shape in {**required, **optional}.items():
            if name in shapes and tuple(shapes[name]) != tuple(shape):
                problems.append(f"tensor {name} has shape {list(shapes[name])}, the config implies {list(shape)}")
        extra = [n for n in shapes if n not in required and n not in optional
                 and not any(fnmatch.fnmatchcase(n, p) for p in cls.ignored)]
        if extra:
            problems.append(f"unexpected tensor(s) {', '.join(sorted(extra)[:5])}"
                            + (" ..." if len(extra) > 5 else "") + " (config does not match the weights?)")
        if problems:
            raise ModelError(f"{cls.name}: " + "; ".join(problems))
        return [n for n in shapes if n in required or n in optional]


def load_tokenizer(tokenizer_json: str | None):
    """A ``tokenizers.Tokenizer`` from its JSON, or None when the model has none."""
    if not tokenizer_json:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


#: Where a causal LM generates: the native engine when it can run the model, only there, or
#: only in the torch modules.
ENGINES = ("auto", "native", "torch")


def check_engine(engine: str) -> None:
    """``ModelError`` unless ``engine`` is one of ``ENGINES``."""
    if engine not in ENGINES:
        raise ModelError(f"engine must be auto, native or torch, got {engine!r}")


def require_tokenizer(tokenizer):
    """``tokenizer``, or ``ModelError`` when the model file carries none."""
    if tokenizer is None:
        raise ModelError("this model file carries no tokenizer; pass token ids instead of text")
    return tokenizer


class WithTokenizer:
    """A model that holds its file's ``tokenizer`` (a ``tokenizers.Tokenizer``, or None)."""

    tokenizer: Any = None

    def _require_tokenizer(self):
        return require_tokenizer(self.tokenizer)


def model_metadata(spec: type[Spec], cfg: Mapping[str, Any], tokenizer_json: str | None,
                   chat_template: str | None = None) -> dict[str, Any]:
    """The .rbe user metadata that makes a model file self-contained (the chat template only
    when the source has one)."""
    out = {"rbe.model": {"architecture": spec.name, "config": dict(cfg)},
           "rbe.tokenizer": json.loads(tokenizer_json) if tokenizer_json else None}
    if chat_template:
        out["rbe.chat_template"] = chat_template
    return out
