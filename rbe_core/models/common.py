"""What every architecture shares: the spec interface, tensor checks, layer factory, generation.

An architecture module (bert, gpt2, llama) provides a ``Spec`` subclass that knows:
the normalised config built from a source config (``from_hf_config``), the tensors that config
needs with their shapes (``expected``), how to build the torch model (``model_class``), and how to
write a standard HF checkpoint (``hf_config``, ``to_hf``). Normalised configs are plain JSON and
travel inside the .rbe metadata under ``"rbe.model"``, next to the tokenizer JSON.
"""

from __future__ import annotations

import abc
import fnmatch
import json
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import attrs
import numpy as np
import torch
from torch import nn

from ..abc import Backend, Encoded
from ..errors import NativeUnavailableError, RBEError
from ..layers import RBEEmbedding, RBELinear
from ..registry import get_backend


class ModelError(RBEError, ValueError):
    """A model cannot be built or run as asked (missing tensor, config mismatch, unsupported
    architecture, prompt longer than the context)."""


@attrs.frozen
class NativePlan:
    """What a native engine needs to run a causal LM without the torch modules.

    ``arch``: 'llama' or 'gpt2'. ``config``: n_layers, hidden, intermediate, n_heads, n_kv_heads,
    head_dim, vocab, max_ctx, eps, rope_theta, rope_style ('none' | 'half' | 'interleaved'),
    activation ('silu_gated' | 'gelu_tanh' | 'gelu' | 'relu'). ``matrices``: (layer or -1, slot,
    weight name, bias name or None, transposed) with slots q k v o gate up down qkv per layer
    and embed pos head globally (no head: tied to the embedding). ``vectors``: (layer or -1, slot,
    name) with norm1 norm1_b norm2 norm2_b per layer and final final_b globally.
    """

    arch: str
    config: dict
    matrices: tuple
    vectors: tuple


class Spec(abc.ABC):
    """One architecture family. Subclasses set ``name`` and implement the class methods."""

    name: ClassVar[str]
    hf_model_types: ClassVar[tuple[str, ...]] = ()
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
    @abc.abstractmethod
    def model_class(cls) -> type[RBEModel]:
        """The torch module class that runs this architecture."""

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
        w = self.param(weight)
        w = w.T.contiguous() if transposed else w
        layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
        return layer

    def embedding(self, name: str) -> nn.Module:
        if not self.dense:
            return RBEEmbedding(self.tensors[name])
        return nn.Embedding.from_pretrained(self.param(name), freeze=False)


def load_tokenizer(tokenizer_json: str | None):
    """A ``tokenizers.Tokenizer`` from its JSON, or None when the model has none."""
    if not tokenizer_json:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


class RBEModel(nn.Module):
    """Base of the model classes: holds the normalised config and the tokenizer."""

    spec: ClassVar[type[Spec]]

    def __init__(self, cfg: Mapping[str, Any], tokenizer=None):
        super().__init__()
        self.config = dict(cfg)
        self.tokenizer = tokenizer

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ModelError("this model file carries no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def embed(self, texts: list[str]) -> torch.Tensor:
        raise ModelError(f"{self.spec.name} models do not produce sentence embeddings; use generate()")

    def generate(self, prompt, **kwargs) -> str:
        raise ModelError(f"{self.spec.name} models do not generate text; use embed()")


class CausalLM(RBEModel):
    """A decoder-only LM: ``forward(ids, past) -> (logits, past)`` plus sampling and generation."""

    @property
    def context_length(self) -> int:
        return int(self.config["max_position"])

    @property
    def eos_ids(self) -> set[int]:
        eos = self.config.get("eos_token_id")
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        ids = list(prompt) if not isinstance(prompt, str) else self._require_tokenizer().encode(prompt).ids
        if not ids:
            raise ModelError("the prompt is empty")
        if len(ids) >= self.context_length:
            raise ModelError(f"the prompt is {len(ids)} tokens; the model's context is {self.context_length}")
        return ids

    @staticmethod
    def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> int:
        """Greedy when ``temperature`` is 0, else sampling with top-k and nucleus (top-p) filtering."""
        if temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits.float() / temperature
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))

    #: The backend's native engine running this model (``Backend.native_decoder``), set by
    #: ``load_model`` when every tensor lowers to a layout it knows; None: the torch modules run.
    native = None

    @property
    def engine_name(self) -> str:
        """'native' when :meth:`start` / :meth:`step` run in the native engine, else 'torch'."""
        return "native" if self.native is not None else "torch"

    @torch.no_grad()
    def start(self, ids: list[int], slot: int = 0) -> tuple[torch.Tensor, Any]:
        """Run a prompt: the last position's logits (1-D float32) and the state :meth:`step` continues.

        The native engine holds one sequence per KV cache ``slot`` (``native.slots`` of them):
        starting another one in the same slot invalidates earlier states of that slot. The torch
        modules keep each sequence's cache in its state (``slot`` is not needed)."""
        if self.native is None:
            logits, past = self(torch.tensor([list(ids)]))
            return logits[0, -1], past
        logits = torch.from_numpy(self.native.forward(ids, 0, slot=slot))
        epochs = self.__dict__.setdefault("_native_epochs", {})
        epochs[slot] = epochs.get(slot, 0) + 1
        return logits, (slot, epochs[slot], len(ids))

    @torch.no_grad()
    def step(self, token: int, state) -> tuple[torch.Tensor, Any]:
        """Append one token to a sequence from :meth:`start`: its logits and the new state."""
        if self.native is None:
            logits, past = self(torch.tensor([[int(token)]]), state)
            return logits[0, -1], past
        slot, epoch, length = state
        if epoch != self.__dict__.get("_native_epochs", {}).get(slot):
            raise ModelError("this sequence was replaced by a newer start() in the same KV cache slot")
        logits = torch.from_numpy(self.native.forward([int(token)], length, slot=slot))
        return logits, (slot, epoch, length + 1)

    def max_new_tokens(self, prompt_tokens: int, requested: int) -> int:
        """``requested`` clamped to the room the context leaves after ``prompt_tokens``."""
        return max(0, min(int(requested), self.context_length - prompt_tokens))

    @torch.no_grad()
    def generate_ids(self, prompt: str | list[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
        """Yield new token ids one by one; stops at EOS (yielded), ``max_new_tokens`` or the context end."""
        ids = self.encode_prompt(prompt)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        logits, state = self.start(ids)
        for i in range(self.max_new_tokens(len(ids), max_new_tokens)):
            tok = self.sample(logits, temperature, top_k, top_p, gen)
            yield tok
            if tok in self.eos_ids or len(ids) + i + 1 >= self.context_length:
                return
            logits, state = self.step(tok, state)

    def stream(self, prompt: str | list[int], max_new_tokens: int = 64, **kwargs) -> Iterator[str]:
        """Yield generated text pieces as they are decoded (EOS is not printed)."""
        tok = self._require_tokenizer()
        new: list[int] = []
        shown = ""
        for t in self.generate_ids(prompt, max_new_tokens, **kwargs):
            if t in self.eos_ids:
                break
            new.append(t)
            text = tok.decode(new, skip_special_tokens=False)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
                continue
            yield text[len(shown):]
            shown = text

    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, **kwargs) -> str:
        """The generated continuation of ``prompt`` as text."""
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))


def model_metadata(spec: type[Spec], cfg: Mapping[str, Any], tokenizer_json: str | None,
                   chat_template: str | None = None) -> dict[str, Any]:
    """The .rbe user metadata that makes a model file self-contained (the chat template only
    when the source has one)."""
    out = {"rbe.model": {"architecture": spec.name, "config": dict(cfg)},
           "rbe.tokenizer": json.loads(tokenizer_json) if tokenizer_json else None}
    if chat_template:
        out["rbe.chat_template"] = chat_template
    return out
