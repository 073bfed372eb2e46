"""The BERT family's sentence embeddings without torch: numpy around a backend's fused products.

``NumpyBert`` runs the model ``families/bert.py`` describes exactly as the torch modules
(``rbe_core.models.bert``) do: embeddings (rows decoded from the codes), post-norm encoder layers
(every Linear through ``Backend.linear`` on the codes), masked mean pooling and, for
sentence-transformers models, L2 normalisation. The torch modules stay the reference
(``tests/rbe_core/test_numpy_bert.py`` compares the two).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..abc import Backend, Encoded
from .spec import ModelError, Spec, WithTokenizer


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to 1.5e-7 (Abramowitz & Stegun 7.1.26), below float32 rounding of the activations."""
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


ACTIVATIONS = {
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3))),
    "relu": lambda x: np.maximum(x, 0.0),
}


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


class NumpyBert(WithTokenizer):
    """A BERT encoder (``embed(texts)`` -> float32 (n, hidden)) over encoded tensors, no torch."""

    engine_name = "numpy"

    def __init__(self, spec: type[Spec], config: Mapping[str, Any], tokenizer, tensors: Mapping[str, Encoded],
                 backend: Backend):
        self.spec, self.config, self.tokenizer = spec, dict(config), tokenizer
        self.tensors, self.backend = tensors, backend
        self.act = ACTIVATIONS[self.config["activation"]]
        if tokenizer is not None:
            tokenizer.enable_padding(pad_id=self.config["pad_token_id"])
            tokenizer.enable_truncation(self.config["max_seq_length"])

    def _vector(self, name: str) -> np.ndarray:
        return self.tensors[name].decode().astype(np.float32)

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        out = self.backend.linear(x.reshape(-1, x.shape[-1]), self.tensors[f"{name}.weight"])
        return out.reshape(*x.shape[:-1], -1) + self._vector(f"{name}.bias")

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return _layer_norm(x, self._vector(f"{name}.weight"), self._vector(f"{name}.bias"), self.config["eps"])

    def _rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any shape) of the embedding table ``name``, decoded from the codes."""
        table = self.tensors[name]
        unique, inverse = np.unique(ids, return_inverse=True)
        rows = np.stack([table.decode_rows(int(i), int(i) + 1)[0] for i in unique])
        return rows[inverse.reshape(ids.shape)]

    def _attention(self, x: np.ndarray, mask: np.ndarray, b: str) -> np.ndarray:
        n, t, h = x.shape
        heads = self.config["n_heads"]
        split = lambda y: y.reshape(n, t, heads, h // heads).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = (split(self._linear(x, f"{b}attention.self.{p}")) for p in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(h // heads)
        scores = np.where(mask[:, None, None, :], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        return self._linear((weights @ v).transpose(0, 2, 1, 3).reshape(n, t, h), f"{b}attention.output.dense")

    def hidden_states(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        """The last hidden states (batch, time, hidden), float32."""
        cfg = self.config
        if ids.shape[1] > cfg["max_position"]:
            raise ModelError(f"input of {ids.shape[1]} tokens exceeds the model's {cfg['max_position']} positions")
        e = f"{cfg['prefix']}embeddings."
        x = (self._rows(f"{e}word_embeddings.weight", ids) + self._rows(f"{e}position_embeddings.weight",
             np.arange(ids.shape[1]))[None] + self._rows(f"{e}token_type_embeddings.weight", types))
        x = self._norm(x, f"{e}LayerNorm")
        for i in range(cfg["n_layers"]):
            b = f"{cfg['prefix']}encoder.layer.{i}."
            x = self._norm(x + self._attention(x, mask, b), f"{b}attention.output.LayerNorm")
            ffn = self._linear(self.act(self._linear(x, f"{b}intermediate.dense")), f"{b}output.dense")
            x = self._norm(x + ffn, f"{b}output.LayerNorm")
        return x.astype(np.float32)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled (and, for sentence-transformers models, L2-normalised) embeddings (n, hidden)."""
        if isinstance(texts, str):
            texts = [texts]
        batch = self._require_tokenizer().encode_batch(list(texts))
        ids, mask, types = (np.array([getattr(b, f) for b in batch]) for f in ("ids", "attention_mask", "type_ids"))
        hidden = self.hidden_states(ids, mask.astype(bool), types)
        m = mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        if self.config["normalize"]:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled.astype(np.float32)

    def generate(self, prompt, **kwargs) -> str:
        raise ModelError(f"{self.spec.name} models do not generate text; use embed()")
