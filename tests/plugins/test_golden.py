"""Golden files written by an earlier version decode bit-exactly (see tests/golden/make_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.numpy
from safetensors import safe_open

import rbe_core

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
FOLDERS = sorted(p.name for p in GOLDEN.iterdir() if (p / "config.json").exists())
EXPECTED = {"int8", "raw", "hadamard", "hadamard-normal", "trellis", "trellis-int8", "int4", "cyclic8", "cyclic16", "packed64", "packed128", "hybrid"}


def test_every_builtin_codec_has_golden_files():
    assert EXPECTED <= set(FOLDERS)


@pytest.mark.parametrize("name", FOLDERS)
def test_golden_decodes_bit_exactly(name):
    folder = GOLDEN / name
    codec = rbe_core.get_codec(json.loads((folder / "config.json").read_text()))
    with safe_open(str(folder / "encoded.safetensors"), framework="numpy") as fh:
        meta = fh.metadata()
        payload = {k: fh.get_tensor(k) for k in fh.keys()}
    enc = rbe_core.Encoded(codec, tuple(json.loads(meta["shape"])), payload, dtype=meta["dtype"])
    codec.validate(enc)
    expected = safetensors.numpy.load_file(str(folder / "expected.safetensors"))["decoded"]
    out = enc.decode()
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert out.tobytes() == expected.tobytes()
    rows = enc.matrix_shape[0]
    assert enc.decode_rows(rows // 3, rows).tobytes() == expected.reshape(rows, -1)[rows // 3 :].tobytes()
