"""Contract tests shared by every seed layout and the int4 baseline: bad input, padding, container
round trip, row decode, fused linear on the backend under test, hostile payloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rbe_core
from rbe_core.errors import InvalidWeightError, RBEFormatError

CONFIGS = [
    {"id": "int4"},
    {"id": "int4", "group_size": 32},
    {"id": "cyclic8"},
    {"id": "cyclic16", "group_size": 16},
    {"id": "packed64"},
    {"id": "packed128", "block": 8},
    {"id": "hybrid", "block_size": 64},
    {"id": "hybrid", "block_size": 64, "transform": "haar", "geometry": "klein", "grade": None, "k": 400},
]
BLOCK_CODECS = {"packed64", "packed128", "hybrid"}
# loose per-codec bound on relative RMSE for the smooth test matrix (catches a broken decode)
SMOOTH_BOUND = {"int4": 0.1, "cyclic8": 0.05, "cyclic16": 0.01, "packed64": 0.1, "packed128": 0.1, "hybrid": 0.1}


def smooth(rows=70, cols=37, seed=0):
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    w = np.sin(i / 9.0 + 0.3) * np.cos(j / 7.0) + 0.01 * rng.standard_normal((rows, cols))
    return w.astype(np.float32)


@pytest.fixture(params=CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def codec(request):
    return rbe_core.get_codec(request.param)


def test_registered_and_config_round_trip(codec):
    assert codec.codec_id in rbe_core.list_codecs()
    again = rbe_core.get_codec(codec.get_config())
    assert again == codec and again.get_config() == codec.get_config()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(codec, bad):
    w = smooth()
    w[3, 4] = bad
    with pytest.raises(InvalidWeightError):
        codec.encode(w)


def test_empty_and_integer_rejected(codec):
    with pytest.raises(InvalidWeightError):
        codec.encode(np.zeros((0, 8), np.float32))
    with pytest.raises(InvalidWeightError):
        codec.encode(np.ones((4, 8), np.int32))


def test_one_dimensional(codec):
    w = np.sin(np.arange(50, dtype=np.float32) / 5)
    if codec.codec_id in BLOCK_CODECS:
        with pytest.raises(InvalidWeightError, match="dimension"):
            codec.encode(w)
    else:
        enc = codec.encode(w)
        assert enc.decode().shape == (50,)
        assert rbe_core.report(enc, w)["relative_rmse"] < SMOOTH_BOUND[codec.codec_id]


def test_padding_and_error_bound(codec):
    w = smooth(70, 37)
    enc = codec.encode(w)
    out = enc.decode()
    assert out.shape == w.shape and out.dtype == np.float32
    assert rbe_core.report(enc, w)["relative_rmse"] < SMOOTH_BOUND[codec.codec_id]


def test_non_contiguous_same_as_contiguous(codec):
    base = smooth(80, 74)
    view = base[:, ::2]
    assert not view.flags.c_contiguous
    a, b = codec.encode(view), codec.encode(np.ascontiguousarray(view))
    assert a.checksum == b.checksum


def test_float16_and_bfloat16_input(codec):
    w = smooth(40, 64)
    ref = codec.encode(w)
    half = codec.encode(w.astype(np.float16))
    bf = codec.encode(torch.from_numpy(w).to(torch.bfloat16))
    assert half.dtype == "float16" and bf.dtype == "bfloat16"
    for enc, src in ((half, w.astype(np.float16)), (bf, torch.from_numpy(w).to(torch.bfloat16))):
        assert enc.decode().shape == w.shape
        assert rbe_core.report(enc, src)["relative_rmse"] < SMOOTH_BOUND[codec.codec_id]
    assert rbe_core.report(ref, w)["relative_rmse"] < SMOOTH_BOUND[codec.codec_id]


def test_three_dimensional_uses_matrix_view(codec):
    w = smooth(24, 40).reshape(24, 4, 10)
    enc = codec.encode(w)
    assert enc.decode().shape == (24, 4, 10)
    assert enc.matrix_shape == (24, 40)


def test_save_open_rows_and_fused_linear(codec, tmp_path, backend, rng):
    w = smooth(70, 37)
    enc = codec.encode(w, source="w")
    path = rbe_core.save(tmp_path / "m.rbe", {"w": enc})
    back = rbe_core.open(path)["w"]
    full = back.decode()
    np.testing.assert_array_equal(full, enc.decode())
    for start, stop in ((0, 70), (5, 9), (63, 70), (10, 10)):
        np.testing.assert_array_equal(back.decode_rows(start, stop), full[start:stop])
    x = rng.standard_normal((3, 37)).astype(np.float32)
    y = backend.linear(x, back)
    np.testing.assert_allclose(np.asarray(y), x @ full.T, rtol=1e-4, atol=1e-4)
    bias = rng.standard_normal(70).astype(np.float32)
    np.testing.assert_allclose(np.asarray(backend.linear(x, back, bias)), x @ full.T + bias, rtol=1e-4, atol=1e-4)


def _mutations(enc):
    """Payloads that must be rejected: a field dropped, one truncated, one with the wrong dtype."""
    fields = sorted(enc.payload)
    yield {k: v for k, v in enc.payload.items() if k != fields[0]}
    for name in fields:
        arr = enc.payload[name]
        yield {**enc.payload, name: arr.reshape(-1)[: max(arr.size - 1, 0)]}
        yield {**enc.payload, name: arr.astype(np.float64)}


def test_hostile_payloads_rejected(codec):
    enc = codec.encode(smooth(70, 37))
    codec.validate(enc)
    for payload in _mutations(enc):
        bad = rbe_core.Encoded(codec, enc.shape, payload, dtype=enc.dtype)
        with pytest.raises(RBEFormatError):
            codec.validate(bad)
    wrong_shape = rbe_core.Encoded(codec, (300, 37), enc.payload, dtype=enc.dtype)
    with pytest.raises(RBEFormatError):
        codec.validate(wrong_shape)
