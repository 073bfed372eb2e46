"""The ``trellis`` codec: the Viterbi search against brute force, stream packing, encode/decode,
block LDLQ against round-to-nearest, lowering and lifting, format checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import rbe_core
from rbe_core import Encoded, RBEFormatError
from rbe_core.native import lower
from rbe_plugins import _trellis
from rbe_plugins.trellis import TrellisCodec


def _paths(rng, rows: int, length: int, bits: int) -> np.ndarray:
    """Random valid paths: a random first state, then random new top bits."""
    states = np.empty((rows, length), dtype=np.uint8)
    states[:, 0] = rng.integers(0, 256, rows)
    for t in range(1, length):
        top = rng.integers(0, 1 << bits, rows).astype(np.uint8) << np.uint8(8 - bits)
        states[:, t] = top | (states[:, t - 1] >> np.uint8(bits))
    return states


def _brute_force(x, weight, bits, start=None):
    """The least cost over every path of a short sequence."""
    cb = _trellis.codebook().astype(np.float64)
    firsts = range(256) if start is None else [
        (b << (8 - bits)) | (start >> bits) for b in range(1 << bits)]
    best = np.inf
    for first in firsts:
        for tops in itertools.product(range(1 << bits), repeat=len(x) - 1):
            s, cost = first, weight[0] * (x[0] - cb[first]) ** 2
            for t, top in enumerate(tops, start=1):
                s = (top << (8 - bits)) | (s >> bits)
                cost += weight[t] * (x[t] - cb[s]) ** 2
            best = min(best, cost)
    return best


def _cost(x, weight, states):
    return float(np.sum(weight * (x - _trellis.codebook()[states].astype(np.float64)) ** 2))


@pytest.mark.parametrize("bits", [2, 3])
def test_search_finds_the_least_cost_path(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((3, 4))
    weight = rng.uniform(0.2, 2.0, (3, 4))
    start = rng.integers(0, 256, 4).astype(np.uint8)
    for s in (None, start):
        states = _trellis.search(x, weight, bits, s)
        assert _trellis.is_path(states.T, bits)
        for n in range(4):
            want = _brute_force(x[:, n], weight[:, n], bits, None if s is None else int(s[n]))
            assert _cost(x[:, n], weight[:, n], states[:, n]) == pytest.approx(want, rel=1e-5)
            if s is not None:  # the first state follows the given one
                assert states[0, n] & ((256 >> bits) - 1) == s[n] >> bits


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_streams_round_trip_and_any_bytes_are_a_path(bits):
    rng = np.random.default_rng(0)
    paths = _paths(rng, 5, 37, bits)
    streams = _trellis.pack_paths(paths, bits)
    assert streams.shape == (5, _trellis.stream_bytes(37, bits))
    assert np.array_equal(_trellis.windows(streams, 37, bits), paths)
    noise = rng.integers(0, 256, streams.shape).astype(np.uint8)
    assert _trellis.is_path(_trellis.windows(noise, 37, bits), bits)
    assert not _trellis.is_path(rng.integers(0, 256, (5, 37)).astype(np.uint8), bits)


@pytest.mark.skipif(_trellis._native is None, reason="the C module was not built (no compiler at install)")
@pytest.mark.parametrize("bits", range(1, 8))
def test_windows_in_c_equal_numpy(bits):
    rng = np.random.default_rng(bits)
    for length in (1, 2, 37, 64, 301):
        streams = rng.integers(0, 256, (3, _trellis.stream_bytes(length, bits))).astype(np.uint8)
        assert np.array_equal(_trellis.windows(streams, length, bits), _trellis._numpy_windows(streams, length, bits))


def test_the_code_tables_are_fixed_and_near_unit_normal():
    normal, whole = _trellis.codebook("normal"), _trellis.codebook("int8")
    for cb in (normal, whole):
        assert cb.dtype == np.float32 and cb.shape == (256,)
    assert abs(float(normal.mean())) < 0.1 and 0.85 < float(normal.std()) < 1.15
    assert np.array_equal(whole, np.round(normal * np.float64(44.0)))  # integers a byte holds
    assert whole.min() == -127 and whole.max() == 127
    with pytest.raises(ValueError, match="table must be one of"):
        _trellis.codebook("uniform")


def test_the_table_is_part_of_the_config():
    assert rbe_core.get_codec("trellis").table == "int8"
    assert rbe_core.get_codec(TrellisCodec(bits=4, table="normal").get_config()).table == "normal"
    with pytest.raises(ValueError, match="table must be one of"):
        TrellisCodec(table="uniform")


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_trellis_beats_the_scalar_grid_of_the_same_bits(bits):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 256)).astype(np.float32)
    enc = rbe_core.get_codec({"id": "trellis", "bits": bits}).encode(w)
    scalar = rbe_core.get_codec({"id": "hadamard", "bits": bits, "grid": "normal"}).encode(w)
    err, err_scalar = (float(np.mean((e.decode() - w) ** 2)) for e in (enc, scalar))
    assert err < 0.9 * err_scalar
    assert enc.bits_per_weight == pytest.approx(scalar.bits_per_weight, abs=0.05)


def test_decode_rows_lowering_and_lifting_agree():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 100)).astype(np.float32)
    codec = TrellisCodec(bits=3, group_size=32)
    enc = codec.encode(w)
    dec = enc.decode()
    assert dec.shape == w.shape and dec.dtype == np.float32
    assert np.array_equal(enc.decode_rows(7, 29), dec[7:29])
    low = lower(enc, cache=False)
    assert low.bits == 8 and np.array_equal(low.decode(), dec)
    lifted = codec.from_lowered(enc, low)
    assert all(np.array_equal(lifted.payload[k], v) for k, v in enc.payload.items())
    broken = low.with_values(codes=rng.integers(0, 256, low.codes.shape).astype(np.uint8))
    with pytest.raises(ValueError, match="trellis paths"):
        codec.from_lowered(enc, broken)


def test_encoding_is_deterministic():
    w = np.random.default_rng(3).standard_normal((64, 128)).astype(np.float32)
    x = np.random.default_rng(4).standard_normal((256, 128)).astype(np.float32)
    codec = TrellisCodec(bits=2)
    for calibration in (None, x):
        a, b = (codec.encode(w, calibration=calibration) for _ in range(2))
        assert a.payload["codes"].tobytes() == b.payload["codes"].tobytes()


def test_ldlq_lowers_the_output_error_of_round_to_nearest():
    rng = np.random.default_rng(5)
    cols = 128
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols)
    x = (rng.standard_normal((2048, cols)) @ mix + 0.3 * rng.standard_normal((2048, 1))).astype(np.float32)
    x[:, :3] *= 8.0
    w = rng.standard_normal((64, cols)).astype(np.float32)
    codec = TrellisCodec(bits=2)

    def out_err(enc):
        return float(np.linalg.norm(x @ (enc.decode() - w).T) / np.linalg.norm(x @ w.T))

    rtn, ldlq = out_err(codec.encode(w)), out_err(codec.encode(w, calibration=x))
    assert ldlq < 0.8 * rtn


def test_bad_configs_and_payloads_are_refused():
    for bad in ({"bits": 7}, {"bits": 1}, {"bits": True}, {"group_size": 48}, {"damp": 0}):
        with pytest.raises(ValueError):
            TrellisCodec(**bad)
    codec = TrellisCodec(bits=3)
    enc = codec.encode(np.ones((4, 64), dtype=np.float32))
    short = dict(enc.payload, codes=enc.payload["codes"][:, :-1])
    with pytest.raises(RBEFormatError):
        codec.validate(Encoded(codec, enc.shape, short, dtype=enc.dtype))
    nan = dict(enc.payload, row_scale=np.full(4, np.nan, dtype=np.float32))
    with pytest.raises(RBEFormatError):
        codec.validate(Encoded(codec, enc.shape, nan, dtype=enc.dtype))


@pytest.mark.skipif(_trellis._native is None, reason="the C search was not built (no compiler at install)")
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_the_c_search_finds_the_numpy_paths_bit_for_bit(bits, monkeypatch):
    rng = np.random.default_rng(6)
    for steps, n in ((1, 5), (9, 33), (200, 70)):
        x = rng.standard_normal((steps, n)).astype(np.float32)
        weight = rng.uniform(0.0, 2.0, (steps, n)).astype(np.float32)
        x[:, :2] = np.round(x[:, :2])  # ties between states
        for start in (None, rng.integers(0, 256, n).astype(np.uint8)):
            native = _trellis.search(x, weight, bits, start)
            with monkeypatch.context() as m:
                m.setattr(_trellis, "_native", None)
                reference = _trellis.search(x, weight, bits, start)
            assert np.array_equal(native, reference)
