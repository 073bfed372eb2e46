import json

import numpy as np
from click.testing import CliRunner

import rbe_core
from rbe_core.cli import main


def run(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_plugins_json_lists_builtins():
    code, out = run("plugins", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {"codecs", "geometries", "backends", "engines", "quantizers", "failed", "disabled"}
    codecs = {c["name"]: c for c in data["codecs"]}
    assert codecs["int8"]["dist"] == "rbe"
    backends = {b["name"]: b for b in data["backends"]}
    assert backends["numpy"]["available"] and backends["numpy"]["dist"] == "rbe"
    assert all(b["available"] or b["reason"] for b in backends.values())


def test_plugins_text():
    code, out = run("plugins")
    assert code == 0 and "int8" in out and "numpy" in out


def test_inspect_json(tmp_path, rng):
    path = tmp_path / "m.rbe"
    w = rng.standard_normal((16, 32)).astype(np.float32)
    rbe_core.save(path, {"w": rbe_core.get_codec("int8").encode(w), "b": np.zeros(16, np.float32)})
    code, out = run("inspect", str(path), "--json")
    assert code == 0
    data = json.loads(out)
    rows = {t["name"]: t for t in data["tensors"]}
    assert rows["w"]["codec"] == {"id": "int8"} and rows["w"]["shape"] == [16, 32]
    assert rows["w"]["status"] == "ok" and 8 < rows["w"]["bits_per_weight"] < 20
    assert data["ok"] and data["total_bytes"] == sum(t["bytes"] for t in data["tensors"])
    code, out = run("inspect", str(path))
    assert code == 0 and "int8" in out


def test_inspect_reports_corruption(tmp_path, rng):
    path = tmp_path / "m.rbe"
    rbe_core.save(path, {"w": rbe_core.get_codec("int8").encode(rng.standard_normal((16, 32)).astype(np.float32))})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x55
    path.write_bytes(bytes(data))
    code, out = run("inspect", str(path), "--json")
    assert code == 1 and "ChecksumError" in json.loads(out)["tensors"][0]["status"]


def test_inspect_bad_file_exits_nonzero(tmp_path):
    (tmp_path / "x.rbe").write_bytes(b"\x00" * 3)
    code, out = run("inspect", str(tmp_path / "x.rbe"))
    assert code == 2 and "error" in out
    code, _ = run("inspect", str(tmp_path / "missing.rbe"))
    assert code == 2


def test_inspect_reports_error_against_the_reference(tmp_path, rng):
    import safetensors.numpy

    w = rng.standard_normal((16, 32)).astype(np.float32)
    src = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"w": w}, str(src))
    path = tmp_path / "m.rbe"
    enc = rbe_core.get_codec("int8").encode(w, source="w")
    rbe_core.save(path, {"w": enc})
    code, out = run("inspect", str(path), "--json", "--reference", str(src))
    assert code == 0
    row = json.loads(out)["tensors"][0]
    assert row["relative_rmse"] == rbe_core.report(enc, w)["relative_rmse"] > 0
    assert {"snr_db", "max_abs_error"} <= set(row)
    code, out = run("inspect", str(path), "--reference", str(src))
    assert code == 0 and "rel.RMSE" in out


def test_internal_error_is_one_line_and_traceback_only_with_verbose(tmp_path, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("boom")

    monkeypatch.setattr(rbe_core, "open", broken)
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.rbe")])
    assert r.exit_code == 1 and r.output.strip() == "rbe: internal error: RuntimeError: boom (run with -v for the traceback)"
    r = CliRunner().invoke(main, ["-v", "inspect", str(tmp_path / "m.rbe")])
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)
