import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import rbe_core
from rbe_core.errors import InvalidWeightError

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 9), st.integers(1, 33)), elements=finite))
def test_round_trip_error_is_half_a_step(w):
    enc = rbe_core.get_codec("int8").encode(w)
    step = np.abs(w).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(enc.decode() - w) <= step / 2 * (1 + 1e-5) + 1e-30)


def test_bits_per_weight_and_rows(rng):
    w = rng.standard_normal((128, 256)).astype(np.float32)
    enc = rbe_core.get_codec("int8").encode(w)
    assert 8.125 < enc.bits_per_weight < 8.2  # 8 + 32/256 + header
    np.testing.assert_array_equal(enc.decode_rows(10, 20), enc.decode()[10:20])
    assert rbe_core.report(enc, w)["relative_rmse"] < 0.01


def test_higher_rank_and_zero_rows(rng):
    w = rng.standard_normal((3, 4, 5)).astype(np.float32)
    w[1] = 0
    dec = rbe_core.get_codec("int8").encode(w).decode()
    assert dec.shape == (3, 4, 5) and np.all(dec[1] == 0)
    np.testing.assert_allclose(dec, w, atol=np.abs(w).max() / 127)


def test_non_contiguous_and_float16(rng):
    w = rng.standard_normal((16, 32)).astype(np.float32)
    codec = rbe_core.get_codec("int8")
    np.testing.assert_array_equal(codec.encode(w.T).decode(), codec.encode(np.ascontiguousarray(w.T)).decode())
    enc16 = codec.encode(w.astype(np.float16))
    assert enc16.dtype == "float16"
    np.testing.assert_allclose(enc16.decode(), w, atol=0.05)


@pytest.mark.parametrize(
    "bad",
    [np.array([[1.0, np.nan]], np.float32), np.array([[np.inf]], np.float32), np.zeros((0, 4), np.float32),
     np.array([[1, 2]], np.int32), np.float32(3.0), "weights"],
)
def test_bad_input(bad):
    with pytest.raises(InvalidWeightError):
        rbe_core.get_codec("int8").encode(bad)
