"""Decoder-only families as one declarative description: Llama 2/3, Mistral, Qwen2/2.5, Qwen3,
Qwen3-MoE, Gemma 2, Gemma 3 (text), Phi-3/Phi-4-mini, SmolLM3, OLMo 2.

A ``Family`` names what distinguishes an architecture (which norms a layer has, q/k norms, fused
projections, Gemma's conventions, llama.cpp's q/k permutation); ``from_hf_config`` / ``from_gguf``
turn a source's config into the normalised *description* below, stored in the .rbe metadata. The
torch modules (``rbe_core.models.decoder``) and the native engine (``DecoderSpec.native_plan``)
both execute the description; neither has code per family.

The description (a JSON dict; keys absent from files written before it take the defaults in
``DEFAULTS``, which describe Llama):

- ``naming`` 'hf' | 'gguf': the tensors' source names (``ROLES``: logical role -> both names).
- sizes: ``vocab_size hidden_size intermediate_size n_layers n_heads n_kv_heads head_dim max_position``.
- ``norms``: the per-layer norms present, of ``attn_norm`` (before attention), ``attn_post_norm``
  (on attention's output, before the residual add), ``ffn_norm``, ``ffn_post_norm``; all RMSNorm
  with ``rms_eps``, weight used as ``w + norm_offset`` (1.0 for Gemma's HF weights).
- ``qk_norm``: 'none' | 'head' (RMSNorm over each head of q and k, Qwen3/Gemma 3) | 'full' (over
  the whole q and k projections, OLMo 2); before RoPE.
- ``biases``: which of q k v o have a bias. ``fused``: q/k/v as one ``qkv`` and gate/up as one
  ``gate_up`` (output [gate | up]) matrix (Phi-3).
- ``activation``: 'silu' | 'gelu_tanh', gated (``act(gate) * up``).
- ``embed_scale``: the embedding rows' multiplier (Gemma: sqrt(hidden)); ``attn_scale``: the
  query scale (None: 1/sqrt(head_dim)); ``attn_softcap`` / ``final_softcap``: ``c * tanh(s / c)``
  on attention scores / logits (0: none); ``tie_embeddings``.
- ``layer_window``: per layer, the sliding window (a query sees the last ``w`` positions, itself
  included; 0: all).
- ``ropes``: RoPE kinds, each ``{"theta", "type": default|linear|llama3|yarn, ...HF parameters}``;
  ``layer_rope``: per layer, the index of its kind, or -1 for a layer without RoPE (SmolLM3);
  ``rotary_dim``: the rotated leading dims of each head (Phi's partial rotary); ``rope_style``
  'half' (HF) | 'interleaved' (llama.cpp's permuted q/k); ``rope_freqs``: the GGUF tensor of
  Llama 3 frequency divisors, or None. ``rope_tables`` turns these into inverse frequencies.
- ``moe``: None, or ``{"n_experts", "top_k", "norm_topk", "intermediate", "layers": [bool]}``:
  the layers whose MLP is a router (softmax over experts, the top k kept, renormalised when
  ``norm_topk``) and experts, each with its own gate/up/down matrices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import numpy as np

from ..spec import ModelError, NativePlan, Spec

#: logical role -> (HF name, GGUF name); ``{i}``: layer, ``{e}``: expert. GGUF's 3-D expert
#: tensors (``blk.{i}.ffn_gate_exps.weight``) are read as one 2-D tensor per expert (``sources``).
ROLES = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm": ("model.norm.weight", "output_norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
    "rope_freqs": (None, "rope_freqs.weight"),
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    "attn_post_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight"),
    "ffn_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    "ffn_post_norm": ("model.layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight"),
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
    "q": ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    "k": ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    "v": ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    "o": ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    "q_bias": ("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias"),
    "k_bias": ("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias"),
    "v_bias": ("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias"),
    "o_bias": ("model.layers.{i}.self_attn.o_proj.bias", "blk.{i}.attn_output.bias"),
    "qkv": ("model.layers.{i}.self_attn.qkv_proj.weight", "blk.{i}.attn_qkv.weight"),
    "gate": ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    "up": ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    "down": ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    "gate_up": ("model.layers.{i}.mlp.gate_up_proj.weight", "blk.{i}.ffn_up.weight"),
    "router": ("model.layers.{i}.mlp.gate.weight", "blk.{i}.ffn_gate_inp.weight"),
    "expert_gate": ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "blk.{i}.ffn_gate_exps.{e}.weight"),
    "expert_up": ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", "blk.{i}.ffn_up_exps.{e}.weight"),
    "expert_down": ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", "blk.{i}.ffn_down_exps.{e}.weight"),
}
_COLUMN = {"hf": 0, "gguf": 1}
#: the norm roles, in the order a layer applies them.
NORMS = ("attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm")

DEFAULTS: dict[str, Any] = {
    "norms": ["attn_norm", "ffn_norm"], "norm_offset": 0.0, "qk_norm": "none", "biases": None, "fused": False,
    "activation": "silu", "embed_scale": 1.0, "attn_scale": None, "attn_softcap": 0.0, "final_softcap": 0.0,
    "layer_window": None, "ropes": None, "layer_rope": None, "rotary_dim": None, "rope_freqs": None, "moe": None,
}
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@attrs.frozen
class Family:
    """What sets one architecture apart from Llama (see the module docstring)."""

    name: str
    hf_types: tuple[str, ...]
    gguf_arch: str | None
    norms: tuple[str, ...] = ("attn_norm", "ffn_norm")
    qk_norm: str = "none"
    fused: bool = False
    #: Gemma: HF norm weights are offsets from 1, the embedding is scaled by sqrt(hidden).
    gemma: bool = False
    #: biases every model of the family has (else: ``attention_bias`` gives q k v o).
    biases: tuple[str, ...] | None = None
    #: llama.cpp's converter permutes q/k rows for this architecture (RoPE on adjacent pairs).
    permuted_gguf: bool = False
    #: GGUF defaults llama.cpp hard-codes: the sliding-window layer pattern and the no-RoPE step.
    swa_pattern: int = 0
    no_rope_step: int = 0
    #: the HF names that differ from ``ROLES``.
    hf_names: Mapping[str, str] = attrs.field(factory=dict)
    #: sliding-window layers have a RoPE of their own, unscaled (Gemma 3: HF ``rope_local_base_freq``
    #: or ``rope_parameters.sliding_attention``, GGUF ``rope.freq_base_swa``)
    local_rope: bool = False
    #: the transformers class ``to_hf`` writes in ``architectures`` (default: ``<Name>ForCausalLM``)
    hf_class: str = ""

    @property
    def hf_architecture(self) -> str:
        return self.hf_class or self.name.title().replace("_", "") + "ForCausalLM"


_GEMMA_NAMES = {"attn_post_norm": "model.layers.{i}.post_attention_layernorm.weight",
                "ffn_norm": "model.layers.{i}.pre_feedforward_layernorm.weight"}
_SANDWICH = ("attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm")
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("llama",), "llama", permuted_gguf=True),
    Family("mistral", ("mistral",), None),
    Family("qwen2", ("qwen2",), "qwen2", biases=("q", "k", "v")),
    Family("qwen3", ("qwen3",), "qwen3", qk_norm="head"),
    Family("qwen3_moe", ("qwen3_moe",), "qwen3moe", qk_norm="head"),
    Family("gemma2", ("gemma2",), "gemma2", norms=_SANDWICH, gemma=True, swa_pattern=2, hf_names=_GEMMA_NAMES),
    Family("gemma3", ("gemma3_text",), "gemma3", norms=_SANDWICH, qk_norm="head", gemma=True, swa_pattern=6,
           hf_names=_GEMMA_NAMES, local_rope=True),
    Family("phi3", ("phi3",), "phi3", fused=True),
    Family("smollm3", ("smollm3",), "smollm3", permuted_gguf=True, no_rope_step=4, hf_class="SmolLM3ForCausalLM"),
    Family("olmo2", ("olmo2",), "olmo2", norms=("attn_post_norm", "ffn_post_norm"), qk_norm="full"),
)}


def described(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with every description key present (files from before a key existed: Llama's)."""
    out = {**DEFAULTS, **cfg}
    n, hd = out["n_layers"], out["head_dim"]
    if out["biases"] is None:
        out["biases"] = ["q", "k", "v", "o"] if out.get("attention_bias") else []
    if out["ropes"] is None:
        out["ropes"] = [{"type": "default", "theta": out.get("rope_theta", 10000.0)}]
    out["layer_rope"] = out["layer_rope"] if out["layer_rope"] is not None else [0] * n
    out["layer_window"] = out["layer_window"] if out["layer_window"] is not None else [0] * n
    out["rotary_dim"] = out["rotary_dim"] or hd
    return out


def name(cfg: Mapping[str, Any], role: str, i: int | None = None, e: int | None = None) -> str:
    """The source's name of ``role`` (of layer ``i``, expert ``e``)."""
    family = FAMILIES.get(cfg.get("family", "llama"), FAMILIES["llama"])
    if cfg["naming"] == "hf":
        template = family.hf_names.get(role, ROLES[role][0])
    else:
        template = ROLES[role][1]
    if template is None:
        raise ModelError(f"{family.name}: {role} has no {cfg['naming']} name")
    return template.format(i=i, e=e)


# ---- RoPE ----

def rope_tables(cfg: Mapping[str, Any], freq_divisors: np.ndarray | None = None) -> list[tuple[np.ndarray, float]]:
    """Per RoPE kind of ``cfg``: (float32 inverse frequencies, rotary_dim / 2 of them; the factor
    on cos and sin), as transformers computes them to within an ulp (the torch modules compute the
    default kind themselves, bit for bit). ``freq_divisors``: the ``rope_freqs`` tensor."""
    d = described(cfg)
    dim = d["rotary_dim"]
    return [_rope_table(r, dim, d["max_position"], freq_divisors) for r in d["ropes"]]


def _rope_table(rope: Mapping[str, Any], dim: int, max_position: int, divisors) -> tuple[np.ndarray, float]:
    base = np.float32(rope["theta"])
    # transformers: 1 / theta ** (float32 exponents) in torch float32. numpy's float32 power is 1
    # ulp off torch's in 4-42 of 32-128 frequencies (thetas 1e4-1e7); the power in float64 rounded
    # to float32 in 0-5 (torch's is not correctly rounded either: only the torch modules, which
    # compute the default kind themselves, match it bit for bit)
    exponents = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float64)
    inv = (np.float32(1.0) / (np.float64(rope["theta"]) ** exponents).astype(np.float32)).astype(np.float32)
    kind, factor = rope.get("type", "default"), float(rope.get("factor") or 1.0)
    attention = 1.0
    if kind == "linear":
        inv = (inv / np.float32(factor)).astype(np.float32)
    elif kind == "llama3":
        inv = _llama3(inv, rope, factor)
    elif kind == "yarn":
        inv, attention = _yarn(rope, base, dim, factor, max_position)
    elif kind != "default":
        raise ModelError(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if divisors is not None:
        inv = (inv / np.asarray(divisors, dtype=np.float32).reshape(-1)).astype(np.float32)
    return inv, attention


def _llama3(inv: np.ndarray, rope: Mapping[str, Any], factor: float) -> np.ndarray:
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = (2 * math.pi / inv).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
    smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(rope: Mapping[str, Any], base: np.float32, dim: int, factor: float, max_position: int):
    old = float(rope.get("original_max_position_embeddings") or max_position)
    if rope.get("factor") is None:
        factor = max_position / old

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction(rotations: float) -> float:
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(float(base)))

    low, high = correction(fast), correction(slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = (1 - ramp).astype(np.float32)
    pos = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv = (1.0 / (np.float32(factor) * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
    return inv.astype(np.float32), float(attention)


def _hf_rope(params: Mapping[str, Any]) -> dict[str, Any]:
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise ModelError(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    out = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor")}
    return {**out, "type": kind, "theta": float(params.get("rope_theta", 10000.0))}


def _hf_ropes(family: Family, hf: Mapping[str, Any], layer_types: list[str]) -> tuple[list[dict], list[int], float]:
    """(ropes, layer_rope, partial rotary factor) of a HF config (v5 ``rope_parameters``, per layer
    type or not, or the older ``rope_theta`` + ``rope_scaling``)."""
    params = hf.get("rope_parameters")
    if params is None:
        params = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 10000.0)}
    if isinstance(params, Mapping) and set(params) and set(params) <= {"full_attention", "sliding_attention"}:
        kinds = sorted(params)
        ropes = [_hf_rope(params[k]) for k in kinds]
        layer_rope = [kinds.index(t) for t in layer_types]
        partial = params[kinds[0]].get("partial_rotary_factor")
    else:
        if family.local_rope and hf.get("rope_local_base_freq"):
            local = {"type": "default", "theta": float(hf["rope_local_base_freq"])}
            ropes = [_hf_rope(params), local]
            layer_rope = [1 if t == "sliding_attention" else 0 for t in layer_types]
        else:
            ropes, layer_rope = [_hf_rope(params)], [0] * len(layer_types)
        partial = params.get("partial_rotary_factor")
    partial = partial or hf.get("partial_rotary_factor") or 1.0
    no_rope = hf.get("no_rope_layers")
    if no_rope is not None:
        layer_rope = [r if use else -1 for r, use in zip(layer_rope, no_rope, strict=True)]
    return ropes, layer_rope, float(partial)


def _hf_layer_types(hf: Mapping[str, Any], n: int) -> list[str]:
    types = hf.get("layer_types")
    if types:
        if len(types) != n:
            raise ModelError(f"layer_types has {len(types)} entries for {n} layers")
        return list(types)
    window = hf.get("sliding_window")
    sliding = window and (hf.get("use_sliding_window", True))
    return ["sliding_attention" if sliding else "full_attention"] * n


def _hf_moe(hf: Mapping[str, Any], n: int) -> dict[str, Any] | None:
    experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    if not experts:
        return None
    step, dense = int(hf.get("decoder_sparse_step", 1) or 1), set(hf.get("mlp_only_layers") or [])
    return {"n_experts": experts, "top_k": int(hf["num_experts_per_tok"]), "norm_topk": bool(hf.get("norm_topk_prob")),
            "intermediate": int(hf["moe_intermediate_size"]),
            "layers": [i not in dense and (i + 1) % step == 0 for i in range(n)]}


def _common(family: Family, **values) -> dict[str, Any]:
    return {"family": family.name, "norms": list(family.norms), "qk_norm": family.qk_norm, "fused": family.fused,
            **values}


def _check_shape(heads: int, kv_heads: int, head_dim: int, rotary: int) -> None:
    if heads % kv_heads or rotary % 2 or not 0 < rotary <= head_dim:
        raise ModelError(f"unsupported attention shape: {heads} heads, {kv_heads} kv heads, head_dim {head_dim}, "
                         f"{rotary} rotated dims")


def from_hf(family: Family, hf: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """The description of a HF ``config.json`` of ``family``."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise ModelError(f"{family.name}: activation {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    if hf.get("mlp_bias"):
        raise ModelError(f"{family.name}: mlp_bias is not supported")
    n, heads, hidden = int(hf["num_hidden_layers"]), int(hf["num_attention_heads"]), int(hf["hidden_size"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    layer_types = _hf_layer_types(hf, n)
    ropes, layer_rope, partial = _hf_ropes(family, hf, layer_types)
    rotary = int(head_dim * partial)
    _check_shape(heads, kv_heads, head_dim, rotary)
    window = int(hf.get("sliding_window") or 0)
    scalar = hf.get("query_pre_attn_scalar")
    return _common(
        family, naming="hf", vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]), n_layers=n, n_heads=heads, n_kv_heads=kv_heads,
        head_dim=head_dim, rms_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=ropes[0]["theta"],
        rope_style="half", max_position=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=ROLES["lm_head"][0] not in names,
        biases=list(family.biases if family.biases is not None else
                    (["q", "k", "v", "o"] if hf.get("attention_bias") else [])),
        norm_offset=1.0 if family.gemma else 0.0, activation=ACTIVATIONS[act],
        embed_scale=math.sqrt(hidden) if family.gemma else 1.0,
        attn_scale=float(scalar) ** -0.5 if scalar else None,
        attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        layer_window=[window if t == "sliding_attention" else 0 for t in layer_types],
        ropes=ropes, layer_rope=layer_rope, rotary_dim=rotary, rope_freqs=None, moe=_hf_moe(hf, n),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), hf_config=dict(hf))


def from_gguf(family: Family, kv: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """The description of a llama.cpp GGUF of ``family`` (its ``{arch}.*`` key/values)."""
    arch = family.gguf_arch

    def get(key, default=None):
        value = kv.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"{family.name} GGUF: metadata key '{arch}.{key}' is missing")
        return value

    n, heads, hidden = int(get("block_count")), int(get("attention.head_count")), int(get("embedding_length"))
    kv_heads = int(kv.get(f"{arch}.attention.head_count_kv") or heads)
    head_dim = int(kv.get(f"{arch}.attention.key_length") or hidden // heads)
    rotary = int(kv.get(f"{arch}.rope.dimension_count") or head_dim)
    _check_shape(heads, kv_heads, head_dim, rotary)
    ropes, layer_rope = _gguf_ropes(family, kv, n)
    window = int(kv.get(f"{arch}.attention.sliding_window") or 0)
    vocab = kv.get(f"{arch}.vocab_size") or len(kv.get("tokenizer.ggml.tokens") or [])
    scale = kv.get(f"{arch}.attention.scale")
    if scale is None and family.gemma and n in (46, 62):  # Gemma 2/3 27B: llama.cpp's own rule
        scale = (hidden / heads) ** -0.5
    return _common(
        family, naming="gguf", vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(kv.get(f"{arch}.feed_forward_length") or 0), n_layers=n, n_heads=heads,
        n_kv_heads=kv_heads, head_dim=head_dim, rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=ropes[0]["theta"], rope_style="interleaved" if family.permuted_gguf else "half",
        max_position=int(get("context_length")), tie_embeddings=ROLES["lm_head"][1] not in names,
        biases=[r for r in ("q", "k", "v", "o") if ROLES[f"{r}_bias"][1].format(i=0) in names],
        norm_offset=0.0, activation="gelu_tanh" if family.gemma else "silu",
        embed_scale=math.sqrt(hidden) if family.gemma else 1.0, attn_scale=None if scale is None else float(scale),
        attn_softcap=float(kv.get(f"{arch}.attn_logit_softcapping") or 0.0),
        final_softcap=float(kv.get(f"{arch}.final_logit_softcapping") or 0.0),
        layer_window=[window if w else 0 for w in _gguf_swa_layers(family, kv, n, window)],
        ropes=ropes, layer_rope=layer_rope, rotary_dim=rotary,
        rope_freqs=ROLES["rope_freqs"][1] if ROLES["rope_freqs"][1] in names else None,
        moe=_gguf_moe(family, kv, n), bos_token_id=kv.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=kv.get("tokenizer.ggml.eos_token_id"), pad_token_id=kv.get("tokenizer.ggml.padding_token_id"))


def _gguf_ropes(family: Family, kv: Mapping[str, Any], n: int) -> tuple[list[dict], list[int]]:
    arch = family.gguf_arch
    kind = kv.get(f"{arch}.rope.scaling.type", "none") or "none"
    rope: dict[str, Any] = {"type": "default", "theta": float(kv.get(f"{arch}.rope.freq_base", 10000.0))}
    if kind == "linear":
        rope.update(type="linear", factor=float(kv.get(f"{arch}.rope.scaling.factor", 1.0)))
    elif kind == "yarn":  # back to the HF parameters convert_hf_to_gguf wrote these keys from
        rope.update(type="yarn", factor=float(kv.get(f"{arch}.rope.scaling.factor", 1.0)))
        for key, hf_key in (("original_context_length", "original_max_position_embeddings"),
                            ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                            ("yarn_attn_factor", "attention_factor")):
            if kv.get(f"{arch}.rope.scaling.{key}") is not None:
                rope[hf_key] = kv[f"{arch}.rope.scaling.{key}"]
    elif kind != "none":
        raise ModelError(f"{family.name} GGUF: rope scaling {kind!r} is not supported (none, linear, yarn)")
    layer_rope = [0] * n
    ropes = [rope]
    if family.local_rope:  # as llama.cpp
        ropes.append({"type": "default", "theta": float(kv.get(f"{arch}.rope.freq_base_swa", 10000.0))})
        layer_rope = [1 if swa else 0 for swa in _gguf_swa_layers(family, kv, n, 1)]
    if family.no_rope_step:
        layer_rope = [r if (i + 1) % family.no_rope_step else -1 for i, r in enumerate(layer_rope)]
    return ropes, layer_rope


def _gguf_swa_layers(family: Family, kv: Mapping[str, Any], n: int, window: int) -> list[bool]:
    """Which layers use the sliding window (llama.cpp: ``il % pattern < pattern - 1``)."""
    if not window:
        return [False] * n
    pattern = kv.get(f"{family.gguf_arch}.attention.sliding_window_pattern", family.swa_pattern)
    if isinstance(pattern, (list, tuple)):
        return [bool(p) for p in pattern][:n]
    pattern = int(pattern or 0)
    return [pattern == 0 or i % pattern < pattern - 1 for i in range(n)]


def _gguf_moe(family: Family, kv: Mapping[str, Any], n: int) -> dict[str, Any] | None:
    arch = family.gguf_arch
    experts = int(kv.get(f"{arch}.expert_count") or 0)
    if not experts:
        return None
    return {"n_experts": experts, "top_k": int(kv[f"{arch}.expert_used_count"]),
            "norm_topk": bool(kv.get(f"{arch}.expert_weights_norm", True)),
            "intermediate": int(kv[f"{arch}.expert_feed_forward_length"]), "layers": [True] * n}


# ---- tensors ----

def layer_roles(cfg: Mapping[str, Any], i: int) -> dict[str, tuple[int, ...]]:
    """Role -> shape of layer ``i``'s tensors (expert roles once, for every expert)."""
    d = described(cfg)
    h, hd, inter = d["hidden_size"], d["head_dim"], d["intermediate_size"]
    q_out, kv_out = d["n_heads"] * hd, d["n_kv_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {n: (h,) for n in d["norms"]}
    if d["qk_norm"] != "none":
        full = d["qk_norm"] == "full"
        shapes.update(q_norm=(q_out if full else hd,), k_norm=(kv_out if full else hd,))
    if d["fused"]:
        shapes["qkv"] = (q_out + 2 * kv_out, h)
    else:
        shapes.update(q=(q_out, h), k=(kv_out, h), v=(kv_out, h))
    shapes["o"] = (h, q_out)
    shapes.update({f"{r}_bias": {"q": (q_out,), "k": (kv_out,), "v": (kv_out,), "o": (h,)}[r] for r in d["biases"]})
    moe = d["moe"]
    if moe and moe["layers"][i]:
        e_inter = moe["intermediate"]
        shapes.update(router=(moe["n_experts"], h), expert_gate=(e_inter, h), expert_up=(e_inter, h),
                      expert_down=(h, e_inter))
    elif d["fused"]:
        shapes.update(gate_up=(2 * inter, h), down=(h, inter))
    else:
        shapes.update(gate=(inter, h), up=(inter, h), down=(h, inter))
    return shapes


def layer_tensors(cfg: Mapping[str, Any], i: int) -> dict[str, tuple[int, ...]]:
    """Source name -> shape of layer ``i``'s tensors."""
    d = described(cfg)
    out = {}
    for role, shape in layer_roles(d, i).items():
        if role.startswith("expert_"):
            out.update({name(d, role, i, e): shape for e in range(d["moe"]["n_experts"])})
        else:
            out[name(d, role, i)] = shape
    return out


def _permute_rows(w: np.ndarray, heads: int, inverse: bool) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF halves -> interleaved pairs), or its inverse."""
    half = w.shape[0] // heads // 2
    if inverse:
        return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def engine_config(d: Mapping[str, Any]) -> dict[str, Any]:
    """``NativePlan.config`` of description ``d``: the sizes under the engine's names, then the
    decoder's settings, RoPE tables (``rope_divisors``: the tensor they are still divided by)."""
    moe = d["moe"] or {}
    return {
        "n_layers": d["n_layers"], "hidden": d["hidden_size"], "intermediate": d["intermediate_size"],
        "n_heads": d["n_heads"], "n_kv_heads": d["n_kv_heads"], "head_dim": d["head_dim"], "vocab": d["vocab_size"],
        "max_ctx": d["max_position"], "eps": d["rms_eps"], "rope_theta": d["ropes"][0]["theta"],
        "rope_style": d["rope_style"], "activation": f"{d['activation']}_gated", "norm_offset": d["norm_offset"],
        "embed_scale": d["embed_scale"], "attn_scale": d["attn_scale"], "attn_softcap": d["attn_softcap"],
        "final_softcap": d["final_softcap"], "rotary_dim": d["rotary_dim"],
        "ropes": [(inv.tolist(), factor) for inv, factor in rope_tables(d)], "rope_divisors": d["rope_freqs"],
        "layer_rope": list(d["layer_rope"]), "layer_window": list(d["layer_window"]),
        "n_experts": moe.get("n_experts", 0), "experts_used": moe.get("top_k", 0),
        "expert_intermediate": moe.get("intermediate", 0), "norm_topk": bool(moe.get("norm_topk")),
    }


class DecoderSpec(Spec):
    """A decoder family executed from its description; one subclass per ``Family``."""

    family: ClassVar[Family]
    ignored = ("*rotary_emb.inv_freq",)

    @classmethod
    def from_hf_config(cls, hf, names, extras=None):
        return from_hf(cls.family, hf, names)

    @classmethod
    def from_gguf(cls, kv, names):
        """Normalised config from GGUF key/values (``{arch}.*`` and ``tokenizer.ggml.*``)."""
        return from_gguf(cls.family, kv, names)

    @classmethod
    def expected(cls, cfg):
        d = described(cfg)
        h, vocab = d["hidden_size"], d["vocab_size"]
        req: dict[str, tuple[int, ...]] = {name(d, "embed"): (vocab, h), name(d, "norm"): (h,)}
        opt: dict[str, tuple[int, ...]] = {}
        (opt if d["tie_embeddings"] else req)[name(d, "lm_head")] = (vocab, h)
        if d["rope_freqs"]:
            req[d["rope_freqs"]] = (d["rotary_dim"] // 2,)
        for i in range(d["n_layers"]):
            req.update(layer_tensors(d, i))
        return req, opt

    @classmethod
    def native_plan(cls, cfg, names):
        d = described(cfg)
        matrices = [(-1, "embed", name(d, "embed"), None, False)]
        if name(d, "lm_head") in names:
            matrices.append((-1, "head", name(d, "lm_head"), None, False))
        vectors = [(-1, "final", name(d, "norm"))]
        for i in range(d["n_layers"]):
            for role in layer_roles(d, i):
                if role in NORMS or role in ("q_norm", "k_norm"):
                    vectors.append((i, role, name(d, role, i)))
                elif role.startswith("expert_"):
                    matrices += [(i, f"{role}.{e}", name(d, role, i, e), None, False)
                                 for e in range(d["moe"]["n_experts"])]
                elif not role.endswith("_bias"):
                    bias = name(d, f"{role}_bias", i) if role in d["biases"] else None
                    matrices.append((i, role, name(d, role, i), bias, False))
        return NativePlan("decoder", engine_config(d), tuple(matrices), tuple(vectors))

    @classmethod
    def hf_config(cls, cfg):
        if cfg["naming"] == "hf":
            return dict(cfg["hf_config"])
        return hf_config_of(cls.family, described(cfg))

    @classmethod
    def to_hf(cls, cfg, tensor_name, array):
        d = described(cfg)
        if d["naming"] == "hf":
            return tensor_name, array
        role, i, e = _role_of(d, tensor_name)
        if role == "rope_freqs":
            raise ModelError(f"{cls.name}: a GGUF's rope_freqs tensor has no HF form; export needs the HF rope scaling")
        if cls.family.permuted_gguf and role in ("q", "q_bias"):
            array = _permute_rows(array, d["n_heads"], inverse=True)
        elif cls.family.permuted_gguf and role in ("k", "k_bias"):
            array = _permute_rows(array, d["n_kv_heads"], inverse=True)
        if cls.family.gemma and (role in NORMS or role in ("norm", "q_norm", "k_norm")):
            array = array - np.float32(1.0)
        hf = {**d, "naming": "hf"}
        return name(hf, role, i, e), array


def _role_of(d: Mapping[str, Any], tensor_name: str) -> tuple[str, int | None, int | None]:
    for role in ("embed", "norm", "lm_head", "rope_freqs"):
        if ROLES[role][1] == tensor_name:
            return role, None, None
    for i in range(d["n_layers"]):
        for role in layer_roles(d, i):
            experts = range(d["moe"]["n_experts"]) if role.startswith("expert_") else [None]
            for e in experts:
                if name(d, role, i, e) == tensor_name:
                    return role, i, e
    raise ModelError(f"{d['family']}: no HF name for GGUF tensor {tensor_name!r}")


def hf_config_of(family: Family, d: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers ``config.json`` for description ``d`` (a GGUF's: no HF config of its own)."""
    layer_types = ["sliding_attention" if w else "full_attention" for w in d["layer_window"]]
    ropes = [{**{k: v for k, v in r.items() if k not in ("type", "theta")}, "rope_type": r["type"],
              "rope_theta": r["theta"]} for r in d["ropes"]]
    partial = d["rotary_dim"] / d["head_dim"]
    if partial != 1.0:
        ropes = [{**r, "partial_rotary_factor": partial} for r in ropes]
    out = {
        "architectures": [family.hf_architecture], "model_type": family.hf_types[0],
        "vocab_size": d["vocab_size"], "hidden_size": d["hidden_size"], "intermediate_size": d["intermediate_size"],
        "num_hidden_layers": d["n_layers"], "num_attention_heads": d["n_heads"],
        "num_key_value_heads": d["n_kv_heads"], "head_dim": d["head_dim"], "rms_norm_eps": d["rms_eps"],
        "max_position_embeddings": d["max_position"], "tie_word_embeddings": d["tie_embeddings"],
        "attention_bias": bool(d["biases"]), "bos_token_id": d["bos_token_id"], "eos_token_id": d["eos_token_id"],
        "pad_token_id": d.get("pad_token_id"),  # explicit: some configs default to ids past a small vocabulary
        "torch_dtype": "float32", "rope_parameters": ropes[0], "layer_types": layer_types,
        "sliding_window": max(d["layer_window"]) or None,
    }
    out["hidden_act" if not family.gemma else "hidden_activation"] = (
        "gelu_pytorch_tanh" if d["activation"] == "gelu_tanh" else "silu")
    if family.gemma:
        scalar = (d["attn_scale"] or d["head_dim"] ** -0.5) ** -2
        out.update(query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,  # an int field
                   attn_logit_softcapping=d["attn_softcap"] or None, final_logit_softcapping=d["final_softcap"] or None)
    if family.local_rope:
        kinds = ["full_attention", "sliding_attention"]
        out["rope_parameters"] = {k: ropes[j] for j, k in enumerate(kinds[:len(ropes)])}
    if family.no_rope_step:
        out["no_rope_layers"] = [int(r >= 0) for r in d["layer_rope"]]
    if d["moe"]:
        moe = d["moe"]
        out.update(num_experts=moe["n_experts"], num_experts_per_tok=moe["top_k"], norm_topk_prob=moe["norm_topk"],
                   moe_intermediate_size=moe["intermediate"], decoder_sparse_step=1,
                   mlp_only_layers=[i for i, m in enumerate(moe["layers"]) if not m])
    if family.name in ("mistral", "phi3") or not any(d["layer_window"]):
        out.pop("layer_types")
    return out


def _spec_class(family: Family) -> type[DecoderSpec]:
    return type(f"{family.name.title().replace('_', '')}Spec", (DecoderSpec,),
                {"name": family.name, "hf_model_types": family.hf_types, "family": family,
                 "__doc__": f"The {family.name} family (``FAMILIES['{family.name}']``)."})


#: family name -> its spec class.
DECODER_SPECS: dict[str, type[DecoderSpec]] = {f.name: _spec_class(f) for f in FAMILIES.values()}
#: GGUF ``general.architecture`` -> family name.
GGUF_ARCHS = {f.gguf_arch: f.name for f in FAMILIES.values() if f.gguf_arch}
