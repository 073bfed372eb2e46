"""The torch modules that run the Llama family (described in ``families/llama.py``)."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import RBEFFN, RBEAttention, RMSNorm, RotaryEmbedding
from .common import CausalLM, LayerFactory
from .families.llama import LlamaSpec, name


class _Block(nn.Module):
    def __init__(self, cfg, f: LayerFactory, i: int, rope: RotaryEmbedding):
        super().__init__()
        bias = (lambda key: name(cfg, key, i)) if cfg["attention_bias"] else (lambda key: None)
        self.attn_norm = RMSNorm(f.param(name(cfg, "attn_norm", i)), cfg["rms_eps"])
        self.attn = RBEAttention(
            q=f.linear(name(cfg, "q", i), bias("q_bias")), k=f.linear(name(cfg, "k", i), bias("k_bias")),
            v=f.linear(name(cfg, "v", i), bias("v_bias")), o=f.linear(name(cfg, "o", i), bias("o_bias")),
            n_heads=cfg["n_heads"], n_kv_heads=cfg["n_kv_heads"], head_dim=cfg["head_dim"], causal=True, rope=rope)
        self.ffn_norm = RMSNorm(f.param(name(cfg, "ffn_norm", i)), cfg["rms_eps"])
        self.ffn = RBEFFN(up=f.linear(name(cfg, "up", i)), down=f.linear(name(cfg, "down", i)),
                          gate=f.linear(name(cfg, "gate", i)), activation="silu")

    def forward(self, x, past=None):
        a, cache = self.attn(self.attn_norm(x), past=past)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), cache


class LlamaForCausalLM(CausalLM):
    spec = LlamaSpec

    def __init__(self, cfg, f: LayerFactory, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.embed_tokens = f.embedding(name(cfg, "embed"))
        rope = RotaryEmbedding(cfg["head_dim"], cfg["rope_theta"], cfg["rope_style"])
        self.layers = nn.ModuleList(_Block(cfg, f, i, rope) for i in range(cfg["n_layers"]))
        self.norm = RMSNorm(f.param(name(cfg, "norm")), cfg["rms_eps"])
        head = name(cfg, "lm_head")
        self.lm_head = f.linear(head if f.has(head) else name(cfg, "embed"))

    def forward(self, ids: torch.Tensor, past=None):
        """Logits (batch, time, vocab) and the per-layer KV cache."""
        x = self.embed_tokens(ids)
        caches = []
        for i, block in enumerate(self.layers):
            x, c = block(x, None if past is None else past[i])
            caches.append(c)
        return self.lm_head(self.norm(x)), caches
