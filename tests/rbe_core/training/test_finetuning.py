"""``rbe finetune``: loss goes down (Llama, BERT), checkpoint + resume = uninterrupted run, interruption
leaves no partial file, the output is a valid model file."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # --import-mode=importlib: make the helpers importable
from _model_helpers import tiny_bert, tiny_llama, torch, write_gguf  # noqa: E402

import rbe_core  # noqa: E402
from rbe_core.cli import main  # noqa: E402
from rbe_core.compression.evaluate import reference_model  # noqa: E402
from rbe_core.models import ModelError  # noqa: E402
from rbe_core.training import finetuning  # noqa: E402

CODEC = {"id": "hadamard", "bits": 3, "group_size": 16}
WORDS = "the of and to in is it that for on with as was at by an be this from or are have not".split()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(" ".join(rng.choice(WORDS, 1500)))
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    write_gguf(tiny_llama(tie_word_embeddings=True), d / "tiny.gguf")
    rbe = rbe_core.compress_model(d / "tiny.gguf", d / "tiny.rbe", codec=CODEC, progress=False, calibration=False)
    return d / "tiny.gguf", rbe


def _bert_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok.to_str()


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    tiny_bert().save_pretrained(d / "hf")
    (d / "hf" / "tokenizer.json").write_text(_bert_tokenizer_json())
    return d / "hf", rbe_core.compress_model(d / "hf", d / "bert.rbe", codec=CODEC, progress=False, calibration=False)


def _run(src, text, out, **kw):
    args = {"steps": 4, "lr": 3e-2, "batch_tokens": 32, "seq_len": 16, "progress": False, **kw}
    return rbe_core.finetune(src, text, out, **args)


def _fixed_loss(path, text, teacher=None) -> float:
    """The training loss of the model in ``path`` on one fixed batch (the models have no dropout)."""
    model = rbe_core.load_model(path)
    ids = finetuning.batch_ids(*finetuning.token_windows(model, text.read_text(), 16), 16, 8, 123, 0)
    with torch.no_grad():
        return finetuning.loss_fn(model, ids, None if teacher is None else reference_model(teacher)).item()


@pytest.mark.parametrize("distil", [False, True], ids=["lm", "distil"])
def test_llama_loss_goes_down_and_output_loads(llama, text, tmp_path, distil):
    gguf, rbe = llama
    teacher = gguf if distil else None
    res = _run(rbe, text, tmp_path / "out.rbe", teacher=teacher)
    assert _fixed_loss(res.path, text, teacher) < _fixed_loss(rbe, text, teacher)
    f = rbe_core.open(res.path)
    src = rbe_core.open(rbe)
    assert f.metadata == src.metadata and set(f) == set(src)
    assert all(f.status(n) == "ok" for n in f)
    changed = [n for n in f if f.headers[n]["sha256"] != src.headers[n]["sha256"]]
    assert "token_embd.weight" in changed  # the tied head trained (and the embedding with it)


@pytest.mark.parametrize("distil", [False, True], ids=["contrastive", "distil"])
def test_bert_loss_goes_down(bert, text, tmp_path, distil):
    hf, rbe = bert
    teacher = hf if distil else None
    res = _run(rbe, text, tmp_path / "out.rbe", teacher=teacher)
    assert _fixed_loss(res.path, text, teacher) < _fixed_loss(rbe, text, teacher)
    assert rbe_core.load_model(res.path).embed(["the of and"]).shape == (1, 64)
    f, src = rbe_core.open(res.path), rbe_core.open(rbe)
    bias = "encoder.layer.0.attention.self.query.bias"
    assert f.headers[bias]["sha256"] != src.headers[bias]["sha256"]  # biases train and are written back


def test_resume_matches_uninterrupted_run(llama, text, tmp_path, monkeypatch):
    gguf, rbe = llama
    full = _run(rbe, text, tmp_path / "full.rbe", checkpoint_every=2)
    calls = {"n": 0}
    real = finetuning.loss_fn

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C during step 3, after the checkpoint of step 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(finetuning, "loss_fn", interrupted)
    out = tmp_path / "part.rbe"
    with pytest.raises(KeyboardInterrupt):
        _run(rbe, text, out, checkpoint_every=2)
    ckpt = tmp_path / "part.rbe.ckpt"
    assert not out.exists()
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-0000002"]  # the last complete one, nothing partial
    assert {p.name for p in (ckpt / "step-0000002").iterdir()} == {"model.rbe", "state.json", "state.safetensors"}
    assert rbe_core.load_model(ckpt / "step-0000002" / "model.rbe") is not None
    monkeypatch.setattr(finetuning, "loss_fn", real)
    res = _run(rbe, text, out, checkpoint_every=2, resume=True)
    assert res.start_step == 2
    np.testing.assert_allclose(res.losses, full.losses, rtol=1e-6)
    a, b = rbe_core.open(full.path), rbe_core.open(res.path)
    assert {n: h["sha256"] for n, h in a.headers.items()} == {n: h["sha256"] for n, h in b.headers.items()}
    with pytest.raises(ModelError, match="lr"):
        _run(rbe, text, out, checkpoint_every=2, resume=True, lr=1e-3)


def test_cli_finetune(llama, text, tmp_path):
    from click.testing import CliRunner

    _, rbe = llama
    out = tmp_path / "cli.rbe"
    res = CliRunner().invoke(main, ["finetune", str(rbe), "--data", str(text), "--steps", "2", "--seq-len", "16",
                                    "--batch-tokens", "32", "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and out.exists()
    res = CliRunner().invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["finetune", str(rbe), "--data", str(text), "--steps", "2", "--seq-len", "4000",
                                    "-o", str(tmp_path / "bad.rbe"), "--batch-tokens", "4000"])
    assert res.exit_code == 2 and "positions" in res.output
    assert not (tmp_path / "bad.rbe").exists()


@pytest.mark.parametrize("quantizer", ["ste", "lsq"])
def test_quantizer_on_a_tied_model(llama, text, tmp_path, quantizer):
    """Quantization-aware training of a model whose embedding is its head (the tied table reads
    the quantized shadow weight; this crashed with AttributeError before). On the codec's own
    grid (hadamard lifts its lowered layout) a step too small to move a code writes the file back
    bit for bit; a real one changes the tied table."""
    gguf, rbe = llama
    src = rbe_core.open(rbe)
    still = _run(rbe, text, tmp_path / "still.rbe", teacher=gguf, quantizer="ste", lr=1e-9, steps=2)
    assert {n: h["sha256"] for n, h in rbe_core.open(still.path).headers.items()} == \
        {n: h["sha256"] for n, h in src.headers.items()}
    res = _run(rbe, text, tmp_path / "qat.rbe", teacher=gguf, quantizer=quantizer, lr=1e-3, steps=4)
    assert np.isfinite(res.losses).all() and np.isfinite(_fixed_loss(res.path, text, gguf))
    f = rbe_core.open(res.path)
    assert f.headers["token_embd.weight"]["sha256"] != src.headers["token_embd.weight"]["sha256"]
