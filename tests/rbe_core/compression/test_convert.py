"""compress_model: policies, bit budgets, parallel jobs, interruption; the CLI model commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # --import-mode=importlib: make the helpers importable
from _model_helpers import mini_gpt2, tiny_bert, tiny_llama, torch  # noqa: E402

import rbe_core  # noqa: E402
from rbe_core.cli import main  # noqa: E402
from rbe_core.models import ModelError  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(d)
    return d


def _codecs(path):
    f = rbe_core.open(path)
    return {n: h["codec"]["id"] for n, h in f.headers.items()}


def test_policy_and_raw_norms(llama_dir, tmp_path):
    out = rbe_core.compress_model(llama_dir, tmp_path / "m.rbe", policy={"*embed_tokens*": "raw"}, progress=False)
    codecs = _codecs(out)
    assert codecs["model.embed_tokens.weight"] == "raw"
    assert codecs["model.layers.0.input_layernorm.weight"] == "raw"
    assert codecs["model.layers.0.mlp.up_proj.weight"] == "int8"
    meta = rbe_core.open(out).metadata
    assert meta["rbe.model"]["architecture"] == "llama" and "model_type" in meta["rbe.model"]["config"]["hf_config"]
    (tmp_path / "bad.json").write_text(json.dumps({"*": {"id": "nope"}}))
    with pytest.raises(rbe_core.UnknownCodecError):
        rbe_core.compress_model(llama_dir, tmp_path / "x.rbe", policy=tmp_path / "bad.json", progress=False)
    assert not (tmp_path / "x.rbe").exists()


def test_target_bpw_keeps_average_under_budget(llama_dir, tmp_path):
    out = rbe_core.compress_model(llama_dir, tmp_path / "m.rbe", target_bpw=9.0, jobs=2, progress=False)
    f = rbe_core.open(out)
    comp = [f[n] for n in f if f.headers[n]["codec"]["id"] != "raw"]
    assert comp and 8.0 * sum(e.nbytes for e in comp) / sum(e.numel for e in comp) <= 9.0
    with pytest.raises(ModelError, match="bits/weight"):
        rbe_core.compress_model(llama_dir, tmp_path / "low.rbe", target_bpw=0.5, progress=False)
    assert not (tmp_path / "low.rbe").exists()


def test_jobs_give_identical_files(llama_dir, tmp_path):
    a = rbe_core.compress_model(llama_dir, tmp_path / "a.rbe", jobs=1, progress=False)
    b = rbe_core.compress_model(llama_dir, tmp_path / "b.rbe", jobs=3, progress=False)
    fa, fb = rbe_core.open(a), rbe_core.open(b)
    assert {n: h["sha256"] for n, h in fa.headers.items()} == {n: h["sha256"] for n, h in fb.headers.items()}


def test_interrupt_leaves_no_partial_file(llama_dir, tmp_path, monkeypatch):
    codec_cls = type(rbe_core.get_codec("int8"))
    calls = []
    original = codec_cls.encode

    def interrupted(self, weight, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, weight, **kw)

    monkeypatch.setattr(codec_cls, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rbe_core.compress_model(llama_dir, tmp_path / "m.rbe", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_infer_export_bench(llama_dir, tmp_path):
    from click.testing import CliRunner

    run = CliRunner().invoke
    out = tmp_path / "m.rbe"
    r = run(main, ["convert", str(llama_dir), "-o", str(out), "--codec", "int8", "--quiet", "--backend", "numpy"])
    assert r.exit_code == 0, r.output
    assert "bits/weight" in r.output
    assert run(main, ["inspect", str(out)]).exit_code == 0
    r = run(main, ["infer", str(out), "--prompt", "x"])
    assert r.exit_code == 2 and "no tokenizer" in r.output  # the tiny HF dir has no tokenizer.json
    r = run(main, ["embed", str(out), "hello"])
    assert r.exit_code == 2 and "embeddings" in r.output
    r = run(main, ["export", str(out), "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    r = run(main, ["export", str(out), "-o", str(tmp_path / "hf")])
    assert r.exit_code == 2 and "not an empty directory" in r.output
    r = run(main, ["bench", str(out), "--prompt-tokens", "8", "--new-tokens", "2", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [row["variant"] for row in rows] == ["rbe", "dense-fp32"]
    assert all(row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["peak_rss_mb"] > 0 for row in rows)


def test_cli_bad_input(llama_dir, tmp_path):
    from click.testing import CliRunner

    run = CliRunner().invoke
    out = tmp_path / "m.rbe"
    r = run(main, ["convert", str(llama_dir), "-o", str(out), "--codec", "int8", "--target-bpw", "4"])
    assert r.exit_code == 2 and "no bit settings" in r.output
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (tmp_path / "cfg" / "model.safetensors").write_bytes(b"junk")
    r = run(main, ["convert", str(tmp_path / "cfg"), "-o", str(out)])
    assert r.exit_code == 2 and "error" in r.output
    r = run(main, ["infer", str(tmp_path / "cfg" / "config.json"), "--prompt", "x"])
    assert r.exit_code == 2
    r = run(main, ["convert", str(llama_dir), "-o", str(out), "--codec", "hadamard", "--calibration-tokens", "8"])
    assert r.exit_code == 2 and "calibration-tokens" in r.output
    assert not out.exists()


def test_cli_convert_calibration_tokens(llama_dir, tmp_path):
    from click.testing import CliRunner

    out = tmp_path / "m.rbe"
    r = CliRunner().invoke(main, ["convert", str(llama_dir), "-o", str(out), "--codec", '{"id": "hadamard", "bits": 3}',
                                  "--calibration-tokens", "64", "--quiet"])
    assert r.exit_code == 0, r.output
    assert {rbe_core.open(out).headers[n]["codec"]["id"] for n in rbe_core.open(out) if "proj" in n} == {"hadamard"}


def test_cli_generation_and_embeddings_with_tokenizers(tmp_path):
    """GPT-2 with a byte-level tokenizer streams text; BERT embeddings come out as JSON."""
    from _model_helpers import byte_level_vocab
    from click.testing import CliRunner
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens, merges = byte_level_vocab()
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split()) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    run = CliRunner().invoke
    for name, model in (("gpt2", mini_gpt2()), ("bert", tiny_bert())):
        model.save_pretrained(tmp_path / name)
        tok.save(str(tmp_path / name / "tokenizer.json"))
        r = run(main, ["convert", str(tmp_path / name), "-o", str(tmp_path / f"{name}.rbe"), "--quiet"])
        assert r.exit_code == 0, r.output
    r = run(main, ["infer", str(tmp_path / "gpt2.rbe"), "--prompt", "the", "--max-tokens", "5",
                   "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"])
    assert r.exit_code == 0, r.output
    again = run(main, ["infer", str(tmp_path / "gpt2.rbe"), "--prompt", "the", "--max-tokens", "5",
                       "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"])
    assert again.output == r.output and len(r.output.strip()) > 0
    r = run(main, ["embed", str(tmp_path / "bert.rbe"), "hello there", "the cat"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["dim"] == 64 and len(data["embeddings"]) == 2
    model = rbe_core.load_model(tmp_path / "bert.rbe")
    assert torch.allclose(torch.tensor(data["embeddings"]), model.embed(["hello there", "the cat"]), atol=1e-6)
    r = run(main, ["infer", str(tmp_path / "gpt2.rbe"), "--prompt", "the " * 300])
    assert r.exit_code == 2 and "context" in r.output
