"""The torch modules that run the BERT family (described in ``families/bert.py``)."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import RBEFFN, RBEAttention, layer_norm
from .common import LayerFactory, RBEModel
from .families.bert import BertSpec
from .spec import ModelError


class _Layer(nn.Module):
    def __init__(self, cfg, f: LayerFactory, b: str):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["eps"]
        lin = lambda n: f.linear(f"{b}{n}.weight", f"{b}{n}.bias")  # noqa: E731
        self.attn = RBEAttention(q=lin("attention.self.query"), k=lin("attention.self.key"),
                                 v=lin("attention.self.value"), o=lin("attention.output.dense"),
                                 n_heads=cfg["n_heads"], head_dim=h // cfg["n_heads"], causal=False)
        ln = lambda n: layer_norm(f.param(f"{b}{n}.weight"), f.param(f"{b}{n}.bias"), eps)  # noqa: E731
        self.ln_attn = ln("attention.output.LayerNorm")
        self.ffn = RBEFFN(up=lin("intermediate.dense"), down=lin("output.dense"), activation=cfg["activation"])
        self.ln_out = ln("output.LayerNorm")

    def forward(self, x, mask):
        x = self.ln_attn(x + self.attn(x, key_padding_mask=mask)[0])
        return self.ln_out(x + self.ffn(x))


class BertEncoder(RBEModel):
    spec = BertSpec

    def __init__(self, cfg, f: LayerFactory, tokenizer=None):
        super().__init__(cfg, tokenizer)
        e = f"{cfg['prefix']}embeddings."
        self.word = f.embedding(f"{e}word_embeddings.weight")
        self.position = f.embedding(f"{e}position_embeddings.weight")
        self.token_type = f.embedding(f"{e}token_type_embeddings.weight")
        self.ln = layer_norm(f.param(f"{e}LayerNorm.weight"), f.param(f"{e}LayerNorm.bias"), cfg["eps"])
        self.layers = nn.ModuleList(_Layer(cfg, f, f"{cfg['prefix']}encoder.layer.{i}.") for i in range(cfg["n_layers"]))
        if self.tokenizer is not None:
            self.tokenizer.enable_padding(pad_id=cfg["pad_token_id"])
            self.tokenizer.enable_truncation(cfg["max_seq_length"])

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden states (batch, time, hidden)."""
        if ids.shape[1] > self.config["max_position"]:
            raise ModelError(f"input of {ids.shape[1]} tokens exceeds the model's {self.config['max_position']} positions")
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
        x = self.word(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))[None] + self.token_type(types)
        x = self.ln(x)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled (and, for sentence-transformers models, L2-normalised) embeddings (n, hidden)."""
        if isinstance(texts, str):
            texts = [texts]
        batch = self._require_tokenizer().encode_batch(list(texts))
        ids = torch.tensor([b.ids for b in batch])
        mask = torch.tensor([b.attention_mask for b in batch])
        types = torch.tensor([b.type_ids for b in batch])
        hidden = self(ids, mask, types)
        m = mask[..., None].float()
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1) if self.config["normalize"] else pooled
