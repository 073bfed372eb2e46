"""What the torch modules of every architecture share: the layer factory, the model base
classes and the causal LM's steps (in the torch modules or the native engine). The descriptions
of the architectures are in ``spec`` and ``families``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..abc import Backend, Encoded
from ..layers import RBEEmbedding, RBELinear
from ..registry import get_backend
from .generation import NativeSequences, TextGeneration
from .spec import ModelError, Spec, WithTokenizer


class LayerFactory:
    """Builds layers from a name -> ``Encoded`` mapping: fused RBE layers, or dense fp32 ``nn``
    layers (``dense=True``, the uncompressed reference the benchmarks compare with)."""

    def __init__(self, tensors: Mapping[str, Encoded], backend: Backend | None = None, dense: bool = False):
        self.tensors, self.dense = tensors, dense
        self.backend = None if dense else (backend if backend is not None else get_backend())

    def has(self, name: str) -> bool:
        return name in self.tensors

    def param(self, name: str) -> torch.Tensor:
        """A small uncompressed tensor (norm weight, bias), decoded to float32."""
        return torch.from_numpy(np.ascontiguousarray(self.tensors[name].decode(), dtype=np.float32))

    def linear(self, weight: str, bias: str | None = None, *, transposed: bool = False) -> nn.Module:
        enc = self.tensors[weight]
        b = self.param(bias) if bias is not None else None
        if not self.dense:
            return RBELinear.from_encoded(enc, b, self.backend, transposed=transposed)
        w = np.ascontiguousarray(enc.decode(), dtype=np.float32)
        w = np.ascontiguousarray(w.T) if transposed else w
        if not w.flags.writeable or any(np.may_share_memory(w, a) for a in enc.payload.values()):
            w = w.copy()
        layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")  # no initial values
        layer.weight = nn.Parameter(torch.from_numpy(w))  # the decode's own array: one copy of the weights
        if b is not None:
            layer.bias = nn.Parameter(b.clone())
        return layer

    def embedding(self, name: str) -> nn.Module:
        if not self.dense:
            return RBEEmbedding(self.tensors[name])
        return nn.Embedding.from_pretrained(self.param(name), freeze=False)


class RBEModel(WithTokenizer, nn.Module):
    """Base of the model classes: holds the normalised config and the tokenizer."""

    spec: ClassVar[type[Spec]]

    def __init__(self, cfg: Mapping[str, Any], tokenizer=None):
        super().__init__()
        self.config = dict(cfg)
        self.tokenizer = tokenizer

    def generate(self, prompt, **kwargs) -> str:
        raise ModelError(f"{self.spec.name} models do not generate text; use embed()")


class CausalLM(TextGeneration, RBEModel):
    """A decoder-only LM in torch modules: ``forward(ids, past) -> (logits, past)``, and
    generation (``TextGeneration``) in them or, when ``native`` is set, in a native engine."""

    _sequences: NativeSequences | None = None

    @property
    def native(self):
        """The backend's native engine running this model's generation (``Backend.native_decoder``),
        set by ``load_model`` when every tensor lowers to a layout it knows; None: the torch modules run."""
        return None if self._sequences is None else self._sequences.engine

    @native.setter
    def native(self, engine) -> None:
        self._sequences = None if engine is None else NativeSequences(engine)

    @property
    def engine_name(self) -> str:
        """'native' when :meth:`start` / :meth:`step` run in the native engine, else 'torch'."""
        return "native" if self._sequences is not None else "torch"

    @torch.no_grad()
    def start(self, ids: list[int], slot: int = 0) -> tuple[torch.Tensor, Any]:
        """Run a prompt: the last position's logits (1-D float32) and the state :meth:`step` continues.

        The native engine holds one sequence per KV cache ``slot`` (``native.slots`` of them):
        starting another one in the same slot invalidates earlier states of that slot. The torch
        modules keep each sequence's cache in its state (``slot`` is not needed)."""
        if self._sequences is None:
            logits, past = self(torch.tensor([list(ids)]))
            return logits[0, -1], past
        logits, state = self._sequences.start(ids, slot)
        return torch.from_numpy(logits), state

    @torch.no_grad()
    def step(self, token: int, state) -> tuple[torch.Tensor, Any]:
        """Append one token to a sequence from :meth:`start`: its logits and the new state."""
        if self._sequences is None:
            logits, past = self(torch.tensor([[int(token)]]), state)
            return logits[0, -1], past
        logits, state = self._sequences.step(token, state)
        return torch.from_numpy(logits), state
