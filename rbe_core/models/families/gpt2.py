"""GPT-2 family from the HF safetensors layout.

GPT-2's projections are ``Conv1D`` modules whose weights are stored (in, out), the transpose of
``nn.Linear``; they stay in that layout in the .rbe and run through ``RBELinear(transposed=True)``.
Checkpoints saved from ``GPT2Model`` have no name prefix, those from ``GPT2LMHeadModel`` use
``transformer.``; the prefix is detected and kept.
"""

from __future__ import annotations

from typing import Any

from ..spec import ModelError, NativePlan, Spec

_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def mini_gpt2_config(vocab_size: int = 1024) -> dict[str, Any]:
    """A transformers ``GPT2Config`` dict for a mini GPT-2 (2 layers, 256 wide, 4 heads): fast tests."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab_size,
            "n_positions": 256, "n_embd": 256, "n_layer": 2, "n_head": 4, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "bos_token_id": vocab_size - 1, "eos_token_id": vocab_size - 1, "tie_word_embeddings": True}


class GPT2Spec(Spec):
    name = "gpt2"
    hf_model_types = ("gpt2",)
    ignored = ("*.attn.bias", "*.attn.masked_bias")

    @classmethod
    def from_hf_config(cls, hf, names, extras=None):
        act = hf.get("activation_function", "gelu_new")
        if act not in _ACT:
            raise ModelError(f"gpt2: activation {act!r} is not supported")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ModelError(f"gpt2: {flag}=true is not supported")
        if hf.get("scale_attn_weights") is False:
            raise ModelError("gpt2: scale_attn_weights=false is not supported")
        hidden = int(hf["n_embd"])
        return {
            "prefix": "transformer." if any(n.startswith("transformer.") for n in names) else "",
            "vocab_size": int(hf["vocab_size"]), "hidden_size": hidden, "n_layers": int(hf["n_layer"]),
            "n_heads": int(hf["n_head"]), "intermediate_size": int(hf.get("n_inner") or 4 * hidden),
            "eps": float(hf.get("layer_norm_epsilon", 1e-5)), "max_position": int(hf["n_positions"]),
            "activation": _ACT[act], "bos_token_id": hf.get("bos_token_id"), "eos_token_id": hf.get("eos_token_id"),
            "hf_config": dict(hf),
        }

    @classmethod
    def expected(cls, cfg):
        p, h, i_sz, v = cfg["prefix"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
        req: dict[str, tuple[int, ...]] = {
            f"{p}wte.weight": (v, h), f"{p}wpe.weight": (cfg["max_position"], h),
            f"{p}ln_f.weight": (h,), f"{p}ln_f.bias": (h,),
        }
        for i in range(cfg["n_layers"]):
            b = f"{p}h.{i}."
            req.update({
                f"{b}ln_1.weight": (h,), f"{b}ln_1.bias": (h,), f"{b}ln_2.weight": (h,), f"{b}ln_2.bias": (h,),
                f"{b}attn.c_attn.weight": (h, 3 * h), f"{b}attn.c_attn.bias": (3 * h,),
                f"{b}attn.c_proj.weight": (h, h), f"{b}attn.c_proj.bias": (h,),
                f"{b}mlp.c_fc.weight": (h, i_sz), f"{b}mlp.c_fc.bias": (i_sz,),
                f"{b}mlp.c_proj.weight": (i_sz, h), f"{b}mlp.c_proj.bias": (h,),
            })
        return req, {"lm_head.weight": (v, h)}

    @classmethod
    def native_plan(cls, cfg, names):
        p, h, heads = cfg["prefix"], cfg["hidden_size"], cfg["n_heads"]
        config = {"n_layers": cfg["n_layers"], "hidden": h, "intermediate": cfg["intermediate_size"],
                  "n_heads": heads, "n_kv_heads": heads, "head_dim": h // heads, "vocab": cfg["vocab_size"],
                  "max_ctx": cfg["max_position"], "eps": cfg["eps"], "rope_style": "none",
                  "activation": cfg["activation"]}
        matrices = [(-1, "embed", f"{p}wte.weight", None, False), (-1, "pos", f"{p}wpe.weight", None, False)]
        if "lm_head.weight" in names:
            matrices.append((-1, "head", "lm_head.weight", None, False))
        vectors = [(-1, "final", f"{p}ln_f.weight"), (-1, "final_b", f"{p}ln_f.bias")]
        for i in range(cfg["n_layers"]):
            b = f"{p}h.{i}."
            for slot, weight in (("qkv", "attn.c_attn"), ("o", "attn.c_proj"), ("up", "mlp.c_fc"), ("down", "mlp.c_proj")):
                matrices.append((i, slot, f"{b}{weight}.weight", f"{b}{weight}.bias", True))
            vectors += [(i, "norm1", f"{b}ln_1.weight"), (i, "norm1_b", f"{b}ln_1.bias"),
                        (i, "norm2", f"{b}ln_2.weight"), (i, "norm2_b", f"{b}ln_2.bias")]
        return NativePlan("gpt2", config, tuple(matrices), tuple(vectors))
