"""Llama family (SmolLM2, TinyLlama, ...) from HF safetensors or llama.cpp GGUF files.

Tensors keep their source names: HF (``model.layers.0.self_attn.q_proj.weight``) or GGUF
(``blk.0.attn_q.weight``). llama.cpp permutes the rows of q and k so that RoPE rotates adjacent
pairs (2i, 2i+1) instead of HF's halves (i, i + d/2); GGUF models therefore run with the
``interleaved`` rope on the weights as stored, and ``to_hf`` un-permutes them for export.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..spec import ModelError, NativePlan, Spec

#: logical tensor -> (HF name, GGUF name); ``{i}`` is the layer index.
NAMES = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm": ("model.norm.weight", "output_norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    "ffn_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    "q": ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    "k": ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    "v": ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    "o": ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    "q_bias": ("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias"),
    "k_bias": ("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias"),
    "v_bias": ("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias"),
    "o_bias": ("model.layers.{i}.self_attn.o_proj.bias", "blk.{i}.attn_output.bias"),
    "gate": ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    "up": ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    "down": ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
}
_COLUMN = {"hf": 0, "gguf": 1}


def name(cfg: Mapping[str, Any], key: str, i: int | None = None) -> str:
    """The source's name of logical tensor ``key`` (of layer ``i``)."""
    template = NAMES[key][_COLUMN[cfg["naming"]]]
    return template.format(i=i) if i is not None else template


def _rope_theta(hf: Mapping[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in (None, "default"):
        raise ModelError(f"llama: rope scaling {kind!r} is not supported")
    return float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))


def _permute_rows(w: np.ndarray, heads: int, inverse: bool) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF halves -> interleaved pairs), or its inverse."""
    rows = w.shape[0]
    half = rows // heads // 2
    if inverse:
        return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class LlamaSpec(Spec):
    name = "llama"
    hf_model_types = ("llama",)
    ignored = ("*rotary_emb.inv_freq",)

    @classmethod
    def from_hf_config(cls, hf, names, extras=None):
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelError(f"llama: activation {hf.get('hidden_act')!r} is not supported (silu only)")
        if hf.get("mlp_bias"):
            raise ModelError("llama: mlp_bias is not supported")
        heads = int(hf["num_attention_heads"])
        return {
            "naming": "hf",
            "vocab_size": int(hf["vocab_size"]),
            "hidden_size": int(hf["hidden_size"]),
            "intermediate_size": int(hf["intermediate_size"]),
            "n_layers": int(hf["num_hidden_layers"]),
            "n_heads": heads,
            "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
            "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // heads),
            "rms_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "rope_theta": _rope_theta(hf),
            "rope_style": "half",
            "max_position": int(hf.get("max_position_embeddings", 2048)),
            "tie_embeddings": "lm_head.weight" not in names,
            "attention_bias": bool(hf.get("attention_bias", False)),
            "bos_token_id": hf.get("bos_token_id"),
            "eos_token_id": hf.get("eos_token_id"),
            "hf_config": dict(hf),
        }

    @classmethod
    def from_gguf(cls, kv: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
        """Normalised config from GGUF key/values (``llama.*`` and ``tokenizer.ggml.*``)."""
        def get(key, default=None):
            value = kv.get(f"llama.{key}", default)
            if value is None:
                raise ModelError(f"llama GGUF: metadata key 'llama.{key}' is missing")
            return value

        if kv.get("llama.rope.scaling.type", "none") not in ("none", None):
            raise ModelError(f"llama GGUF: rope scaling {kv['llama.rope.scaling.type']!r} is not supported")
        heads, hidden = int(get("attention.head_count")), int(get("embedding_length"))
        head_dim = int(kv.get("llama.attention.key_length") or kv.get("llama.rope.dimension_count") or hidden // heads)
        vocab = kv.get("llama.vocab_size") or len(kv.get("tokenizer.ggml.tokens") or [])
        return {
            "naming": "gguf",
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(get("feed_forward_length")),
            "n_layers": int(get("block_count")),
            "n_heads": heads,
            "n_kv_heads": int(kv.get("llama.attention.head_count_kv") or heads),
            "head_dim": head_dim,
            "rms_eps": float(get("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(kv.get("llama.rope.freq_base", 10000.0)),
            "rope_style": "interleaved",
            "max_position": int(get("context_length")),
            "tie_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
            "bos_token_id": kv.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": kv.get("tokenizer.ggml.eos_token_id"),
        }

    @classmethod
    def expected(cls, cfg):
        h, hd, i_sz = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
        q_out, kv_out = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd
        req: dict[str, tuple[int, ...]] = {name(cfg, "embed"): (cfg["vocab_size"], h), name(cfg, "norm"): (h,)}
        opt: dict[str, tuple[int, ...]] = {}
        (opt if cfg["tie_embeddings"] else req)[name(cfg, "lm_head")] = (cfg["vocab_size"], h)
        for i in range(cfg["n_layers"]):
            shapes = {"attn_norm": (h,), "ffn_norm": (h,), "q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h),
                      "o": (h, q_out), "gate": (i_sz, h), "up": (i_sz, h), "down": (h, i_sz)}
            if cfg["attention_bias"]:
                shapes.update(q_bias=(q_out,), k_bias=(kv_out,), v_bias=(kv_out,), o_bias=(h,))
            req.update({name(cfg, k, i): s for k, s in shapes.items()})
        return req, opt

    @classmethod
    def native_plan(cls, cfg, names):
        config = {"n_layers": cfg["n_layers"], "hidden": cfg["hidden_size"], "intermediate": cfg["intermediate_size"],
                  "n_heads": cfg["n_heads"], "n_kv_heads": cfg["n_kv_heads"], "head_dim": cfg["head_dim"],
                  "vocab": cfg["vocab_size"], "max_ctx": cfg["max_position"], "eps": cfg["rms_eps"],
                  "rope_theta": cfg["rope_theta"], "rope_style": cfg["rope_style"], "activation": "silu_gated"}
        bias = cfg["attention_bias"]
        matrices = [(-1, "embed", name(cfg, "embed"), None, False)]
        if name(cfg, "lm_head") in names:
            matrices.append((-1, "head", name(cfg, "lm_head"), None, False))
        vectors = [(-1, "final", name(cfg, "norm"))]
        for i in range(cfg["n_layers"]):
            for key in ("q", "k", "v", "o", "gate", "up", "down"):
                b = name(cfg, f"{key}_bias", i) if bias and key in ("q", "k", "v", "o") else None
                matrices.append((i, key, name(cfg, key, i), b, False))
            vectors += [(i, "norm1", name(cfg, "attn_norm", i)), (i, "norm2", name(cfg, "ffn_norm", i))]
        return NativePlan("llama", config, tuple(matrices), tuple(vectors))

    @classmethod
    def hf_config(cls, cfg):
        if cfg["naming"] == "hf":
            return dict(cfg["hf_config"])
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": cfg["vocab_size"], "hidden_size": cfg["hidden_size"],
            "intermediate_size": cfg["intermediate_size"], "num_hidden_layers": cfg["n_layers"],
            "num_attention_heads": cfg["n_heads"], "num_key_value_heads": cfg["n_kv_heads"],
            "head_dim": cfg["head_dim"], "rms_norm_eps": cfg["rms_eps"], "rope_theta": cfg["rope_theta"],
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg["rope_theta"]},
            "max_position_embeddings": cfg["max_position"], "tie_word_embeddings": cfg["tie_embeddings"],
            "attention_bias": cfg["attention_bias"], "mlp_bias": False,
            "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "torch_dtype": "float32",
        }

    @classmethod
    def to_hf(cls, cfg, tensor_name, array):
        if cfg["naming"] == "hf":
            return tensor_name, array
        for key, (hf_t, gguf_t) in NAMES.items():
            for i in [None] if "{i}" not in gguf_t else range(cfg["n_layers"]):
                if gguf_t.format(i=i) == tensor_name:
                    if key in ("q", "q_bias"):
                        array = _permute_rows(array, cfg["n_heads"], inverse=True)
                    elif key in ("k", "k_bias"):
                        array = _permute_rows(array, cfg["n_kv_heads"], inverse=True)
                    return hf_t.format(i=i), array
        raise ModelError(f"llama: no HF name for GGUF tensor {tensor_name!r}")
