"""The torch modules that run every decoder-only family from its description
(``families/decoder.py``: Llama, Mistral, Qwen2/3, Qwen3-MoE, Gemma 2/3, Phi-3, SmolLM3, OLMo 2).

One model class executes any description; ``DECODER_MODELS`` holds one subclass per family only
so that ``spec`` names the family (``MODEL_CLASSES``, ``spec.native_plan``). The module tree is
the one calibration and training walk: ``layers`` (a ModuleList of blocks), linear layers and the
embedding from the ``LayerFactory``, norms over ``LayerFactory.param`` tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..layers import RBEFFN, RBEAttention, RMSNorm, RotaryEmbedding
from .common import CausalLM, LayerFactory
from .families.decoder import DECODER_SPECS, described, name, rope_tables
from .spec import ModelError


class MoE(nn.Module):
    """A router and experts: softmax (float32) over the router's logits, the ``top_k`` kept
    (renormalised when ``norm_topk``), each token's output the weighted sum of its experts'. An
    expert runs only on the tokens routed to it."""

    def __init__(self, router: nn.Module, experts: list[RBEFFN], top_k: int, norm_topk: bool):
        super().__init__()
        self.router, self.experts = router, nn.ModuleList(experts)
        self.top_k, self.norm_topk = top_k, norm_topk

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids), each (tokens, top_k), of the rows of ``x`` (tokens, hidden)."""
        probs = torch.softmax(self.router(x).float(), -1)
        weights, ids = torch.topk(probs, self.top_k, -1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.route(flat)
        out = torch.zeros_like(flat)
        for e in torch.unique(ids).tolist():  # ascending, like transformers' sum
            tokens, slot = torch.where(ids == e)
            out.index_add_(0, tokens, self.experts[e](flat[tokens]) * weights[tokens, slot, None])
        return out.view(x.shape)


class DecoderBlock(nn.Module):
    """One layer of a description: [attn_norm] attention [attn_post_norm] + residual, then
    [ffn_norm] MLP or MoE [ffn_post_norm] + residual."""

    def __init__(self, d: Mapping[str, Any], f: LayerFactory, i: int, rope: RotaryEmbedding | None):
        super().__init__()
        eps, offset = d["rms_eps"], d["norm_offset"]

        def norm(role: str) -> RMSNorm:
            return RMSNorm(f.param(name(d, role, i)), eps, offset)

        def linear(role: str, e: int | None = None) -> nn.Module:
            bias = name(d, f"{role}_bias", i) if role in d["biases"] else None
            return f.linear(name(d, role, i, e), bias)

        for role in ("attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm"):
            setattr(self, role, norm(role) if role in d["norms"] else None)
        qk = d["qk_norm"]
        q_norm, k_norm = (None, None) if qk == "none" else (norm("q_norm"), norm("k_norm"))
        if d["fused"]:
            if set(d["biases"]) - {"o"}:
                raise ModelError(f"{d['family']}: q/k/v biases with a fused qkv projection are not supported")
            proj = {"qkv": f.linear(name(d, "qkv", i))}
        else:
            proj = {r: linear(r) for r in ("q", "k", "v")}
        self.attn = RBEAttention(
            **proj, o=linear("o"), n_heads=d["n_heads"], n_kv_heads=d["n_kv_heads"], head_dim=d["head_dim"],
            causal=True, rope=rope, scale=d["attn_scale"], softcap=d["attn_softcap"], window=d["layer_window"][i],
            q_norm=q_norm, k_norm=k_norm, qk_norm="head" if qk == "none" else qk)
        act, moe = d["activation"], d["moe"]
        if moe and moe["layers"][i]:
            experts = [RBEFFN(up=linear("expert_up", e), down=linear("expert_down", e),
                              gate=linear("expert_gate", e), activation=act) for e in range(moe["n_experts"])]
            self.ffn: nn.Module = MoE(f.linear(name(d, "router", i)), experts, moe["top_k"], moe["norm_topk"])
        elif d["fused"]:
            self.ffn = RBEFFN(None, linear("down"), gate_up=linear("gate_up"), activation=act)
        else:
            self.ffn = RBEFFN(up=linear("up"), down=linear("down"), gate=linear("gate"), activation=act)

    def forward(self, x, past=None):
        a, cache = self.attn(x if self.attn_norm is None else self.attn_norm(x), past=past)
        x = x + (a if self.attn_post_norm is None else self.attn_post_norm(a))
        m = self.ffn(x if self.ffn_norm is None else self.ffn_norm(x))
        return x + (m if self.ffn_post_norm is None else self.ffn_post_norm(m)), cache


def _rope(d: Mapping[str, Any], rope: Mapping[str, Any], inv, factor: float) -> RotaryEmbedding:
    """One RoPE kind of the description. The default kind without frequency divisors computes
    transformers' own float32 formula (bit for bit; ``rope_tables`` can be 1 ulp off in a few
    frequencies, and a calibrated conversion's codes follow such differences: the SmolLM2 flagship
    4.25 measured perplexity 19.83 with the exact table, 20.39 with 5 of 32 frequencies 1 ulp off);
    other kinds take the table."""
    exact = rope.get("type", "default") == "default" and not d["rope_freqs"]
    return RotaryEmbedding(d["head_dim"], float(rope["theta"]), d["rope_style"], inv_freq=None if exact else inv,
                           attention_factor=factor, rotary_dim=d["rotary_dim"])


class DecoderForCausalLM(CausalLM):
    """Any decoder-only family, run from its description (``families.decoder``). The family
    subclasses in ``DECODER_MODELS`` set ``spec``; built directly, the config's ``family`` does."""

    def __init__(self, cfg: Mapping[str, Any], f: LayerFactory, tokenizer=None):
        super().__init__(cfg, tokenizer)
        if getattr(type(self), "spec", None) is None:  # the base class: the config's family
            self.spec = DECODER_SPECS[cfg.get("family", "llama")]
        d = described(cfg)
        divisors = f.param(d["rope_freqs"]).numpy() if d["rope_freqs"] else None
        tables = rope_tables(d, divisors)
        self.ropes = nn.ModuleList(_rope(d, rope, inv, factor) for rope, (inv, factor) in zip(d["ropes"], tables, strict=True))
        self.embed_tokens = f.embedding(name(d, "embed"))
        self.embed_scale = float(d["embed_scale"])
        self.layers = nn.ModuleList(
            DecoderBlock(d, f, i, self.ropes[r] if r >= 0 else None) for i, r in enumerate(d["layer_rope"]))
        self.norm = RMSNorm(f.param(name(d, "norm")), d["rms_eps"], d["norm_offset"])
        head = name(d, "lm_head")
        self.lm_head = f.linear(head if f.has(head) else name(d, "embed"))
        self.final_softcap = float(d["final_softcap"])

    def forward(self, ids: torch.Tensor, past=None):
        """Logits (batch, time, vocab) and the per-layer KV cache."""
        x = self.embed_tokens(ids)
        if self.embed_scale != 1.0:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        caches = []
        for i, block in enumerate(self.layers):
            x, c = block(x, None if past is None else past[i])
            caches.append(c)
        logits = self.lm_head(self.norm(x))
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits, caches


def _model_class(spec) -> type[DecoderForCausalLM]:
    stem = spec.__name__.removesuffix("Spec")
    return type(f"{stem}ForCausalLM", (DecoderForCausalLM,),
                {"spec": spec, "__module__": __name__, "__doc__": f"The {spec.name} family's causal LM."})


#: family name -> its model class (``spec`` set to the family's spec).
DECODER_MODELS: dict[str, type[DecoderForCausalLM]] = {n: _model_class(s) for n, s in DECODER_SPECS.items()}
LlamaForCausalLM = DECODER_MODELS["llama"]
