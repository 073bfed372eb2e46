"""The example third-party plugin (``example-nf``), pip-installed into the test environment like a
user would. Each test runs its code in a fresh interpreter: plugins are discovered at import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "rbe-codec-example"
GOLDEN = ROOT / "tests" / "golden" / "example-nf"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def installed_example():
    pip("install", "--no-deps", "--no-build-isolation", str(EXAMPLE))
    yield
    pip("uninstall", "-y", "rbe-codec-example")


def fresh_python(code: str) -> Any:
    """Run ``code`` in a new interpreter (which discovers plugins from scratch); the JSON value
    it prints (its whole stdout)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_listed_with_distribution_and_capabilities(installed_example):
    out = fresh_python("from rbe_core.cli import main; main(['plugins', '--json'])")
    codecs = {c["name"]: c for c in out["codecs"]}
    row = codecs["example-nf"]
    assert row["dist"] == "rbe-codec-example" and codecs["int8"]["dist"] == "rbe"
    assert "numpy" in row["paths"] and set(row["paths"].values()) == {"native"}
    assert row["trains"] is True and row["calibrates"] is True


def test_round_trip_lowering_and_backends(installed_example, tmp_path):
    out = fresh_python(f"""
        import json, attrs, numpy as np, rbe_core
        rng = np.random.default_rng(0)
        big = rng.standard_normal((256, 1024)).astype(np.float32)
        odd = rng.standard_normal((48, 3, 50)).astype(np.float32)  # 150 columns: padded groups
        res = {{"rmse": {{}}, "bpw": {{}}, "checks": [], "err": {{}}, "path": {{}}}}
        base = rbe_core.get_codec("example-nf")
        res["settings"] = [c.get_config() for c in base.bit_settings()]
        res["trainable"] = list(base.trainable_lowered)
        backends = [rbe_core.get_backend(r["name"]) for r in rbe_core.list_backends()
                    if r["available"] and r["name"] in ("numpy", "cffi", "torch")]
        for bits in (2, 3, 4):
            codec = rbe_core.get_codec({{"id": "example-nf", "bits": bits}})
            enc = codec.encode(big)
            res["rmse"][bits] = rbe_core.report(enc, big)["relative_rmse"]
            res["bpw"][bits] = enc.bits_per_weight
            for w in (big, odd):
                enc = codec.encode(w)
                dec = enc.decode()
                rows, cols = enc.matrix_shape
                lowered = codec.lower(enc)
                back = codec.from_lowered(enc, lowered)
                path = str({str(tmp_path)!r}) + f"/w{{bits}}.rbe"
                rbe_core.save(path, {{"w": enc}})
                opened = rbe_core.open(path)["w"]
                res["checks"] += [
                    dec.shape == w.shape and dec.dtype == np.float32,
                    lowered.decode().tobytes() == dec.reshape(rows, cols).tobytes(),
                    enc.decode_rows(5, rows).tobytes() == dec.reshape(rows, cols)[5:].tobytes(),
                    sorted(back.payload) == sorted(enc.payload),
                    all(np.array_equal(back.payload[k], enc.payload[k]) for k in enc.payload),
                    opened.decode().tobytes() == dec.tobytes() and opened.codec == codec,
                ]
                wm = dec.reshape(rows, cols)
                x = rng.standard_normal((3, cols)).astype(np.float32)
                g = rng.standard_normal((3, rows)).astype(np.float32)
                for be in backends:
                    if be.name == "torch":
                        import torch
                        y = be.linear(torch.from_numpy(x), opened).numpy()
                        gi = be.linear_grad_input(torch.from_numpy(g), opened).numpy()
                    else:
                        y, gi = be.linear(x, opened), be.linear_grad_input(g, opened)
                    err = max(float(np.abs(y - x @ wm.T).max() / np.abs(x @ wm.T).max()),
                              float(np.abs(gi - g @ wm).max() / np.abs(g @ wm).max()))
                    res["err"][be.name] = max(res["err"].get(be.name, 0.0), err)
                    res["path"][be.name] = be.path(opened)
        print(json.dumps(res))
    """)
    assert all(out["checks"]), out["checks"]
    assert [c["bits"] for c in out["settings"]] == [4, 3, 2] and out["trainable"] == ["step"]
    rmse, bpw = out["rmse"], out["bpw"]
    assert rmse["3"] < 0.2 and rmse["2"] < 0.5 and rmse["4"] < 0.1 and rmse["4"] < rmse["3"] < rmse["2"]
    for bits in (2, 3, 4):
        assert bits + 0.25 < bpw[str(bits)] < bits + 0.25 + 0.02  # + the tensor's JSON header
    assert {"numpy", "torch"} <= set(out["path"]) and set(out["path"].values()) == {"native"}
    assert max(out["err"].values()) < 1e-5, out["err"]


def test_file_written_by_uninstalled_plugin_names_it(installed_example, tmp_path):
    path = str(tmp_path / "e.rbe")
    fresh_python(f"""
        import numpy as np, rbe_core
        rbe_core.save({path!r}, {{"w": rbe_core.get_codec("example-nf").encode(np.ones((2, 2), np.float32))}})
        print("null")
    """)
    code = f"import rbe_core; rbe_core.open({path!r})['w']"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"RBE_DISABLE_PLUGINS": "example-nf", "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0
    assert "UnknownCodecError" in done.stderr and "pip install rbe-codec-example" in done.stderr


def test_golden_file_decodes_bit_exactly(installed_example):
    """Files written once by examples/rbe-codec-example/make_golden.py; never regenerated here."""
    out = fresh_python(f"""
        import json, numpy as np, rbe_core, safetensors.numpy
        f = rbe_core.open({str(GOLDEN / "encoded.rbe")!r})
        expected = safetensors.numpy.load_file({str(GOLDEN / "expected.safetensors")!r})
        w = safetensors.numpy.load_file({str(GOLDEN / "input.safetensors")!r})["weight"]
        res = {{}}
        for name in sorted(f):
            enc, want = f[name], expected[name]
            rows = enc.matrix_shape[0]
            out = enc.decode()
            res[name] = dict(
                bits=enc.codec.bits, plugin=f.headers[name]["plugin"],
                exact=out.dtype == want.dtype and out.shape == want.shape and out.tobytes() == want.tobytes(),
                rows=enc.decode_rows(rows // 3, rows).tobytes() == want[rows // 3:].tobytes(),
                lowered=enc.codec.lower(enc).decode().tobytes() == want.tobytes(),
                rmse=float(np.sqrt(np.mean((out - w) ** 2) / np.mean(w ** 2))),
            )
        print(json.dumps(res))
    """)
    assert sorted(out) == ["nf2", "nf3", "nf4"] and [r["bits"] for r in out.values()] == [2, 3, 4]
    for name, r in out.items():
        assert r["plugin"] == "rbe-codec-example" and r["exact"] and r["rows"] and r["lowered"], name
        assert r["rmse"] < 0.5, name


def test_rejects_bad_payloads_weights_configs_and_lowerings(installed_example):
    out = fresh_python("""
        import json, attrs, numpy as np, rbe_core
        from rbe_core.errors import InvalidWeightError, RBEFormatError
        codec = rbe_core.get_codec("example-nf")
        enc = codec.encode(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32))
        lowered = codec.lower(enc)

        def raises(fn, exc):
            try:
                fn()
            except exc:
                return True
            except Exception as other:
                return f"{type(other).__name__}: {other}"
            return False

        def payload(**fields):
            return rbe_core.Encoded(codec, enc.shape, {**enc.payload, **fields})

        res = {
            "truncated": raises(lambda: codec.validate(payload(codes=enc.payload["codes"][:, :-1])), RBEFormatError),
            "missing": raises(lambda: codec.validate(rbe_core.Encoded(codec, enc.shape, {"codes": enc.payload["codes"]})), RBEFormatError),
            "scale_dtype": raises(lambda: codec.validate(payload(scale=enc.payload["scale"].astype(np.float32))), RBEFormatError),
            "nan": raises(lambda: codec.encode(np.array([[1.0, np.nan]], np.float32)), InvalidWeightError),
            "bits5": raises(lambda: rbe_core.get_codec({"id": "example-nf", "bits": 5}), (ValueError, RBEFormatError)),
            "group48": raises(lambda: rbe_core.get_codec({"id": "example-nf", "group_size": 48}), (ValueError, RBEFormatError)),
            "levels": raises(lambda: codec.from_lowered(enc, lowered.with_values(levels=lowered.levels * 2)), ValueError),
            "offset": raises(lambda: codec.from_lowered(enc, lowered.with_values(offset=lowered.step)), ValueError),
            "codes": raises(lambda: codec.from_lowered(enc, lowered.with_values(codes=lowered.codes + 8)), ValueError),
            "shape": raises(lambda: codec.from_lowered(rbe_core.Encoded(codec, (4, 64), enc.payload), lowered), ValueError),
            "bits": raises(lambda: attrs.evolve(codec, bits=4).from_lowered(enc, lowered), ValueError),
        }
        print(json.dumps(res))
    """)
    assert all(v is True for v in out.values()), out


# --- end-to-end on models: see below ---
# The plugin on a real (tiny, random) Llama in this process: plugins rediscovered after the
# install, the way `rbe` finds them; nothing below is specific to the example codec.


@pytest.fixture(scope="module")
def nf_model(installed_example, tmp_path_factory):
    """(teacher GGUF, text file, the model converted to example-nf without calibration)."""
    import numpy as np

    import rbe_core

    sys.path.insert(0, str(ROOT / "tests" / "rbe_core"))
    from _model_helpers import tiny_llama, write_gguf

    rbe_core.reload_plugins()
    d = tmp_path_factory.mktemp("nf")
    write_gguf(tiny_llama(tie_word_embeddings=True), d / "tiny.gguf")
    words = "the of and to in is it that for on with as was at by an be this from or are have not".split()
    (d / "text.txt").write_text(" ".join(np.random.default_rng(0).choice(words, 1500)))
    rtn = rbe_core.compress_model(d / "tiny.gguf", d / "rtn.rbe", codec="example-nf", progress=False, calibration=False)
    yield d / "tiny.gguf", d / "text.txt", rtn
    rbe_core.reload_plugins()


def _distill_loss(path, text, teacher) -> float:
    """KL to the teacher on one fixed batch."""
    import torch

    import rbe_core
    from rbe_core.compression.evaluate import reference_model
    from rbe_core.training import finetuning

    model = rbe_core.load_model(path, "torch")
    ids = finetuning.batch_ids(*finetuning.token_windows(model, Path(text).read_text(), 16), 16, 8, 123, 0)
    with torch.no_grad():
        return finetuning.loss_fn(model, ids, reference_model(teacher)).item()


def test_converted_model_runs_on_the_native_engine(nf_model, monkeypatch):

    import rbe_core

    monkeypatch.setenv("RBE_ENGINE_ACT", "f32")  # float prefill: the torch modules' exact arithmetic
    _, _, rtn = nf_model
    f = rbe_core.open(rtn)
    assert {f.headers[n]["codec"]["id"] for n in f if len(f.headers[n]["shape"]) == 2} == {"example-nf"}
    native = rbe_core.load_model(rtn, "cffi", engine="native")
    modules = rbe_core.load_model(rtn, "cffi", engine="torch")
    assert native.engine_name == "native" and modules.engine_name != "native"
    ids = [1, 5, 9, 17, 33]
    a = list(native.generate_ids(ids, max_new_tokens=6))
    b = list(modules.generate_ids(ids, max_new_tokens=6))
    assert len(a) == 6 and a == b


def test_calibrated_conversion_and_bit_budget(nf_model, tmp_path):
    import rbe_core

    gguf, text, rtn = nf_model
    gptq = rbe_core.compress_model(gguf, tmp_path / "gptq.rbe", codec="example-nf", progress=False,
                                   calibration=text)
    assert _distill_loss(gptq, text, gguf) < _distill_loss(rtn, text, gguf)
    mixed = rbe_core.compress_model(gguf, tmp_path / "mixed.rbe", codec="example-nf", target_bpw=3.0,
                                    progress=False, calibration=text)
    f = rbe_core.open(mixed)
    budgeted = [f[n] for n in f if f.headers[n]["codec"]["id"] == "example-nf"
                and "token_embd" not in n and len(f.headers[n]["shape"]) == 2]
    bits = {e.codec.bits for e in budgeted}
    assert len(bits) >= 2 and bits <= {2, 3, 4}
    assert sum(8 * e.nbytes for e in budgeted) / sum(e.numel for e in budgeted) <= 3.0 + 1e-6


def test_finetune_codec_parameters_lowers_the_distillation_loss(nf_model, tmp_path):
    import rbe_core

    gguf, text, rtn = nf_model
    res = rbe_core.finetune(rtn, text, tmp_path / "ft.rbe", steps=6, teacher=gguf, lr=3e-2, batch_tokens=64,
                            seq_len=16, progress=False)
    assert _distill_loss(res.path, text, gguf) < _distill_loss(rtn, text, gguf)
    f = rbe_core.open(res.path)
    assert all(f.status(n) == "ok" for n in f) and f.headers["token_embd.weight"]["codec"]["id"] == "example-nf"


@pytest.mark.parametrize("quantizer", ["ste", "lsq"])
def test_finetune_with_a_quantizer_works_on_the_codec_grid(nf_model, tmp_path, quantizer):
    """QAT on the plugin's own level table: a step too small to move a code writes the file back
    bit for bit (training starts exactly from the compressed model); a real one moves codes."""
    import rbe_core

    gguf, text, rtn = nf_model
    kw = {"teacher": gguf, "quantizer": quantizer, "batch_tokens": 64, "seq_len": 16, "progress": False}
    still = rbe_core.finetune(rtn, text, tmp_path / "still.rbe", steps=2, lr=1e-9, **kw)
    src = rbe_core.open(rtn)
    assert {n: h["sha256"] for n, h in rbe_core.open(still.path).headers.items()} == \
        {n: h["sha256"] for n, h in src.headers.items()}
    res = rbe_core.finetune(rtn, text, tmp_path / "qat.rbe", steps=2, lr=5e-3, **kw)  # shadows start at cell centres
    f = rbe_core.open(res.path)
    assert all(f.status(n) == "ok" for n in f)
    assert any(f.headers[n]["sha256"] != src.headers[n]["sha256"] for n in f if "blk" in n)
