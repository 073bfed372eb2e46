"""``rbe eval`` / ``rbe_core.compression.evaluate`` on tiny random models: sane perplexity, KL, agreement, cosines."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # --import-mode=importlib: make the helpers importable
from _model_helpers import tiny_bert, tiny_llama, write_gguf  # noqa: E402

import rbe_core  # noqa: E402
from rbe_core.cli import main  # noqa: E402
from rbe_core.compression.calibration import sentences  # noqa: E402
from rbe_core.compression.evaluate import evaluate  # noqa: E402
from rbe_core.models import ModelError  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. A second sentence follows the first one here. "
        "Compressed weights are decoded inside the matrix multiply.\n\nAnother paragraph starts with these words. "
        "It ends after a few more tokens of plain English text.") * 3


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("evl")
    write_gguf(tiny_llama(tie_word_embeddings=True), d / "tiny.gguf")
    return d / "tiny.gguf", rbe_core.compress_model(d / "tiny.gguf", d / "tiny.rbe", codec="int8", progress=False)


def test_causal_eval_against_reference(llama):
    src, rbe = llama
    res = evaluate(rbe, TEXT, src, window=32, dense=True)
    assert res["kind"] == "causal-lm" and res["tokens"] > 50 and res["windows"] >= 2
    assert 1.0 < res["perplexity"] < 10 * 300  # a random 300-token model: near-uniform predictions
    assert 0.0 <= res["kl"] < 0.01 and res["top1_agreement"] > 0.9  # int8 stays close to the source
    assert 0 < res["bits_per_weight"] < 9
    same = evaluate(rbe, TEXT, rbe, window=32, dense=True)  # an .rbe reference decoded densely: the same weights
    assert same["kl"] < 1e-6 and same["top1_agreement"] == 1.0
    assert math.isclose(same["perplexity"], res["perplexity"], rel_tol=1e-4)


def test_cli_eval_json(llama):
    from click.testing import CliRunner

    src, rbe = llama
    text = Path(rbe).parent / "text.txt"
    text.write_text(TEXT)
    r = CliRunner().invoke(main, ["eval", str(rbe), "--text", str(text), "--reference", str(src), "--window", "32",
                                  "--max-tokens", "64", "--json"])  # fused kernels
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["perplexity"] > 1 and out["kl"] >= 0 and 0 <= out["top1_agreement"] <= 1
    (Path(rbe).parent / "empty.txt").write_text("x")
    r = CliRunner().invoke(main, ["eval", str(rbe), "--text", str(Path(rbe).parent / "empty.txt")])
    assert r.exit_code == 2 and "fewer than 2 tokens" in r.output


def test_gguf_side_by_side_counts_bits_two_ways(llama, tmp_path):
    """A llama.cpp-quantized GGUF is evaluated like an .rbe file (dequantized by the ``gguf``
    package), with bits counted over the Linear layers and over every byte of the file."""
    src, rbe = llama
    write_gguf(tiny_llama(tie_word_embeddings=True), tmp_path / "q8.gguf", quantize_blocks=True)
    q8 = evaluate(tmp_path / "q8.gguf", TEXT, src, window=32)
    assert q8["linear_bpw"] == 8.5  # Q8_0: 34 bytes per 32 weights
    assert 0.0 < q8["kl"] < 0.01 and q8["file_bpw"] > q8["linear_bpw"] / 2
    f32 = evaluate(src, TEXT, src, window=32)
    assert f32["kl"] < 1e-9 and f32["linear_bpw"] == 32.0
    ours = evaluate(rbe, TEXT, src, window=32, dense=True)
    assert 8.0 < ours["linear_bpw"] < 9.0 and ours["file_bpw"] > ours["linear_bpw"] / 2


def _bert_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w.strip(".").lower() for w in TEXT.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok.to_str()


def test_encoder_eval_cosines(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(_bert_tokenizer_json())
    rbe = rbe_core.compress_model(tmp_path / "hf", tmp_path / "b.rbe", codec="int8", progress=False)
    res = evaluate(rbe, TEXT, tmp_path / "hf")
    assert res["kind"] == "encoder" and res["sentences"] == len(sentences(TEXT))
    assert -1 <= res["min_cosine"] <= res["mean_cosine"] <= 1 + 1e-6 and res["mean_cosine"] > 0.99
    assert "mean_cosine" not in evaluate(rbe, TEXT)
    with pytest.raises(ModelError, match="no sentences"):
        evaluate(rbe, "too short")


def test_sentences_split():
    assert sentences("One two three four. Five six seven eight!\n\nnine ten eleven twelve\nthirteen", 4) == [
        "One two three four.", "Five six seven eight!", "nine ten eleven twelve thirteen"]
