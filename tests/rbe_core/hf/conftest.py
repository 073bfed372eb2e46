"""Tiny random-weight transformers models built from configs (offline), one per architecture family."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'rbe[hf]')")
torch = pytest.importorskip("torch")

import rbe_core.hf  # noqa: E402,F401  (with it rbe_core, whose import registers quant_method "rbe")

_LM = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LM, tie_word_embeddings=False))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_LM, tie_word_embeddings=False))


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**_LM, tie_word_embeddings=False))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=64))


def _opt():
    return transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=128,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              max_position_embeddings=64, word_embed_proj_dim=64))


def _bert():
    return transformers.BertModel(transformers.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          max_position_embeddings=64))


def _vit():
    return transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64,
                                                        intermediate_size=128, num_hidden_layers=2,
                                                        num_attention_heads=4))


#: name -> (builder, causal LM?)
ARCHS = {"llama": (_llama, True), "qwen2": (_qwen2, True), "mistral": (_mistral, True), "gpt2": (_gpt2, True),
         "opt": (_opt, True), "bert": (_bert, False), "vit": (_vit, False)}
CAUSAL = [n for n, (_b, c) in ARCHS.items() if c]


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return ARCHS[name][0]().eval()


def inputs(name: str, seed: int = 1) -> dict:
    """One batch of model inputs for architecture ``name``."""
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(0, 96, (2, 12), generator=g)}


def output(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
