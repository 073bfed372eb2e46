"""The torch modules that run the GPT-2 family (described in ``families/gpt2.py``)."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import RBEFFN, RBEAttention, layer_norm
from .common import CausalLM, LayerFactory
from .families.gpt2 import GPT2Spec
from .spec import ModelError


class _Block(nn.Module):
    def __init__(self, cfg, f: LayerFactory, b: str):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["eps"]
        self.ln_1 = layer_norm(f.param(f"{b}ln_1.weight"), f.param(f"{b}ln_1.bias"), eps)
        self.attn = RBEAttention(
            qkv=f.linear(f"{b}attn.c_attn.weight", f"{b}attn.c_attn.bias", transposed=True),
            o=f.linear(f"{b}attn.c_proj.weight", f"{b}attn.c_proj.bias", transposed=True),
            n_heads=cfg["n_heads"], head_dim=h // cfg["n_heads"], causal=True)
        self.ln_2 = layer_norm(f.param(f"{b}ln_2.weight"), f.param(f"{b}ln_2.bias"), eps)
        self.mlp = RBEFFN(up=f.linear(f"{b}mlp.c_fc.weight", f"{b}mlp.c_fc.bias", transposed=True),
                          down=f.linear(f"{b}mlp.c_proj.weight", f"{b}mlp.c_proj.bias", transposed=True),
                          activation=cfg["activation"])

    def forward(self, x, past=None):
        a, cache = self.attn(self.ln_1(x), past=past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), cache


class GPT2LMHead(CausalLM):
    spec = GPT2Spec

    def __init__(self, cfg, f: LayerFactory, tokenizer=None):
        super().__init__(cfg, tokenizer)
        p = cfg["prefix"]
        self.wte = f.embedding(f"{p}wte.weight")
        self.wpe = f.embedding(f"{p}wpe.weight")
        self.blocks = nn.ModuleList(_Block(cfg, f, f"{p}h.{i}.") for i in range(cfg["n_layers"]))
        self.ln_f = layer_norm(f.param(f"{p}ln_f.weight"), f.param(f"{p}ln_f.bias"), cfg["eps"])
        self.lm_head = f.linear("lm_head.weight" if f.has("lm_head.weight") else f"{p}wte.weight")

    def forward(self, ids: torch.Tensor, past=None):
        """Logits (batch, time, vocab) and the per-layer KV cache."""
        offset = 0 if past is None else past[0][0].shape[2]
        if offset + ids.shape[1] > self.context_length:
            raise ModelError(f"sequence of {offset + ids.shape[1]} tokens exceeds the context of {self.context_length}")
        pos = torch.arange(offset, offset + ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)[None]
        caches = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, None if past is None else past[i])
            caches.append(c)
        return self.lm_head(self.ln_f(x)), caches
