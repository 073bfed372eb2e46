"""The backend contract, run against whichever backend the session forces (RBE_BACKEND)."""

import numpy as np
import pytest
import torch

import rbe_core
from rbe_core.arrays import CHUNK_ELEMENTS

SHAPES = [(1, 1), (7, 13), (33, 64), (130, 70)]


@pytest.mark.parametrize("codec_id", rbe_core.list_codecs())
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_dense(backend, codec_id, shape, rng):
    w = rng.standard_normal(shape).astype(np.float32)
    enc = rbe_core.get_codec(codec_id).encode(w)
    dense = enc.decode().reshape(enc.matrix_shape)
    x = rng.standard_normal((5, shape[1])).astype(np.float32)
    bias = rng.standard_normal(shape[0]).astype(np.float32)
    y = backend.linear(x, enc, bias)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (5, shape[0])
    np.testing.assert_allclose(y, x @ dense.T + bias, rtol=1e-5, atol=1e-5 * np.abs(x).sum(1).max())
    g = rng.standard_normal((5, shape[0])).astype(np.float32)
    gi = backend.linear_grad_input(g, enc)
    np.testing.assert_allclose(gi, g @ dense, rtol=1e-5, atol=1e-5 * np.abs(g).sum(1).max())


def test_torch_input_keeps_kind_dtype_and_leading_dims(backend, rng):
    w = rng.standard_normal((24, 16)).astype(np.float32)
    enc = rbe_core.get_codec("int8").encode(w)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    y = backend.linear(x, enc)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64 and y.shape == (2, 3, 24)
    ref = x.float() @ torch.from_numpy(enc.decode()).T
    torch.testing.assert_close(y.float(), ref, rtol=1e-5, atol=1e-5)
    gi = backend.linear_grad_input(torch.ones(2, 3, 24), enc)
    assert gi.shape == (2, 3, 16)


def test_large_matrix_spans_several_chunks(backend, rng):
    rows = 2 * CHUNK_ELEMENTS // 512 + 3
    w = rng.standard_normal((rows, 512)).astype(np.float32)
    enc = rbe_core.get_codec("int8").encode(w)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    np.testing.assert_allclose(backend.linear(x, enc), x @ enc.decode().T, rtol=1e-4, atol=1e-3)


def test_decode_matches_codec(backend, rng):
    enc = rbe_core.get_codec("int8").encode(rng.standard_normal((9, 11)).astype(np.float32))
    out = backend.decode(enc)
    out = out.cpu().numpy() if isinstance(out, torch.Tensor) else out
    np.testing.assert_allclose(out, enc.decode(), rtol=1e-6)


def test_shape_mismatch_is_a_clear_error(backend, rng):
    enc = rbe_core.get_codec("int8").encode(rng.standard_normal((4, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="expects 8"):
        backend.linear(np.ones((2, 7), np.float32), enc)


def test_availability_is_reported(backend):
    ok, reason = type(backend).availability()
    assert ok and reason == ""
    assert isinstance(type(backend).features(), tuple)
