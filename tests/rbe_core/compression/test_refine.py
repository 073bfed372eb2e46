"""``rbe refine``: block-wise reconstruction of the continuous parameters against the float model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # --import-mode=importlib: make the helpers importable
from _model_helpers import tiny_llama, write_gguf  # noqa: E402

import rbe_core  # noqa: E402
from rbe_core.cli import main  # noqa: E402
from rbe_core.compression import refine as refine_mod  # noqa: E402
from rbe_core.compression.data import teacher_text  # noqa: E402
from rbe_core.compression.evaluate import evaluate  # noqa: E402
from rbe_core.models import ModelError  # noqa: E402
from rbe_plugins._hadamard_codes import stored_codes  # noqa: E402

WORDS = "the of heat is theory light cold warm energy flows from hot bodies to colder ones in time".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("refine")
    write_gguf(tiny_llama(tie_word_embeddings=True, num_hidden_layers=3), d / "tiny.gguf")
    rng = np.random.default_rng(0)
    paras = [" ".join(rng.choice(WORDS, 40)) + "." for _ in range(300)]
    (d / "data.txt").write_text("\n\n".join(paras))
    rbe = rbe_core.compress_model(d / "tiny.gguf", d / "q.rbe", codec={"id": "hadamard", "bits": 3}, calibration=False,
                                  progress=False)
    return d, rbe


def test_refine_never_hurts_a_block_and_lowers_the_error(tiny):
    d, rbe = tiny
    res = refine_mod.refine(rbe, d / "tiny.gguf", d / "r.rbe", data=str(d / "data.txt"), tokens=2048, window=32,
                            batch=4, epochs=3, lr=3e-3, norm_lr=1e-3, progress=False)
    assert len(res["blocks"]) == 3
    assert all(b["after"] <= b["before"] for b in res["blocks"])
    assert res["mean_after"] < res["mean_before"]
    out = rbe_core.open(d / "r.rbe")
    src = rbe_core.open(rbe)
    assert out.metadata["rbe.refine"]["tokens"] == 2048
    assert set(out) == set(src)
    changed = [n for n in out if out[n].checksum != src[n].checksum]
    assert any("attn_norm" in n for n in changed) and any("ffn_down" in n for n in changed)
    for n in out:  # codes frozen: the lowered codes are the same, only steps and norms moved
        if src.headers[n]["codec"]["id"] == "hadamard":
            np.testing.assert_array_equal(stored_codes(out[n].payload), stored_codes(src[n].payload))
    text = (d / "data.txt").read_text()[-3000:]
    before = evaluate(rbe, text, d / "tiny.gguf", window=32)
    after = evaluate(d / "r.rbe", text, d / "tiny.gguf", window=32)
    assert after["kl"] < before["kl"]


def test_refine_resumes_after_an_interruption(tiny, monkeypatch):
    d, rbe = tiny
    kwargs = dict(data=str(d / "data.txt"), tokens=1024, window=32, batch=4, epochs=1, progress=False)
    refine_mod.refine(rbe, d / "tiny.gguf", d / "full.rbe", **kwargs)
    real = refine_mod._checkpoint

    def dies_after_block_1(ckpt, src_file, encs, raws, settings, block, stats):
        real(ckpt, src_file, encs, raws, settings, block, stats)
        if block == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(refine_mod, "_checkpoint", dies_after_block_1)
    with pytest.raises(KeyboardInterrupt):
        refine_mod.refine(rbe, d / "tiny.gguf", d / "resumed.rbe", **kwargs)
    assert not (d / "resumed.rbe").exists() and (d / "resumed.rbe.refine-ckpt" / "state.json").is_file()
    monkeypatch.setattr(refine_mod, "_checkpoint", real)
    res = refine_mod.refine(rbe, d / "tiny.gguf", d / "resumed.rbe", resume=True, **kwargs)
    assert [b["block"] for b in res["blocks"]] == [0, 1, 2]
    a, b = rbe_core.open(d / "full.rbe"), rbe_core.open(d / "resumed.rbe")
    assert {n: a[n].checksum for n in a} == {n: b[n].checksum for n in b}
    assert not (d / "resumed.rbe.refine-ckpt").exists()
    monkeypatch.setattr(refine_mod, "_checkpoint", dies_after_block_1)
    with pytest.raises(KeyboardInterrupt):
        refine_mod.refine(rbe, d / "tiny.gguf", d / "x.rbe", **kwargs)
    with pytest.raises(ModelError, match="cannot resume with a different epochs"):
        refine_mod.refine(rbe, d / "tiny.gguf", d / "x.rbe", resume=True, **{**kwargs, "epochs": 2})


def test_cli_refine_and_errors(tiny):
    from click.testing import CliRunner

    d, rbe = tiny
    r = CliRunner().invoke(main, ["refine", str(rbe), "--source", str(d / "tiny.gguf"), "-o", str(d / "c.rbe"),
                                  "--data", str(d / "data.txt"), "--refine-tokens", "512", "--refine-epochs", "1",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    assert "block output error" in r.output and (d / "c.rbe").is_file()
    other = tiny_llama(seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=3)
    write_gguf(other, d / "other.gguf")
    r = CliRunner().invoke(main, ["refine", str(rbe), "--source", str(d / "other.gguf"), "-o", str(d / "e.rbe"),
                                  "--data", str(d / "data.txt")])
    assert r.exit_code == 2 and "not the same model" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["refine", str(rbe), "--source", str(d / "tiny.gguf"), "-o", str(d / "e.rbe"),
                                  "--data", "builtin:nope"])
    assert r.exit_code == 2 and "unknown data source" in r.output


def test_cli_convert_refine(tiny):
    from click.testing import CliRunner

    d, _rbe = tiny
    out = d / "cr.rbe"
    r = CliRunner().invoke(main, ["convert", str(d / "tiny.gguf"), "-o", str(out), "--codec", "int4", "--refine",
                                  "--data", str(d / "data.txt"), "--refine-tokens", "512", "--refine-epochs", "1",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    assert "refined: block output error" in r.output
    assert "rbe.refine" in rbe_core.open(out).metadata and not (d / "cr.rbe.unrefined.rbe").exists()
    r = CliRunner().invoke(main, ["convert", str(d / "tiny.gguf"), "-o", str(d / "x"), "--hf", "--refine"])
    assert r.exit_code == 2 and "cannot be combined with --hf" in r.output


def test_teacher_text_samples_the_float_model(tiny):
    from rbe_core.compression.calibration import source_model
    from rbe_core.models.sources import open_source

    d, _rbe = tiny
    model, _f = source_model(open_source(d / "tiny.gguf"))
    text = teacher_text(model, tokens=256, length=32, batch=4)
    assert len(text.split("\n\n")) == 8 and len(text) > 100
    assert teacher_text(model, tokens=256, length=32, batch=4) == text  # seeded
    json.dumps(text)
