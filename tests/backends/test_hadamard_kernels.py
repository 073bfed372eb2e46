"""Native ``hadamard`` kernels (numpy, cffi on every ISA, torch) against ``x @ decode().T``."""

from __future__ import annotations

import functools

import attrs
import numpy as np
import pytest
import torch

import rbe_core
from rbe_backends.cffi import CffiBackend
from rbe_backends.cffi import ops as cffi_ops
from rbe_backends.numpy import hadamard as had
from rbe_backends.torch import ops as torch_ops

BITS = [2, 3, 4, 8]
GRIDS = ["uniform", "normal"]
SHAPES = [(37, 100), (64, 576), (24, 1536)]
CFFI_OK, CFFI_WHY = CffiBackend.availability()
needs_cffi = pytest.mark.skipif(not CFFI_OK, reason=f"cffi backend unavailable: {CFFI_WHY}")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


#: The codec's own row decoder, kept before ``no_decode`` replaces it: the reference weight.
_DECODE_ROWS = type(rbe_core.get_codec("hadamard")).decode_rows


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@functools.cache
def encoded(bits: int, shape: tuple[int, int], group_size: int = 64, grid: str = "uniform"):
    w = np.random.default_rng(bits * 1000 + shape[1]).standard_normal(shape).astype(np.float32)
    return rbe_core.get_codec({"id": "hadamard", "bits": bits, "group_size": group_size, "grid": grid}).encode(w)


@pytest.fixture
def no_decode(monkeypatch):
    """The native paths never call the codec's decode; fail loudly if one falls back to it."""
    codec_cls = type(rbe_core.get_codec("hadamard"))

    def refuse(*_a, **_k):
        raise AssertionError("hadamard kernel fell back to decode_rows")

    monkeypatch.setattr(codec_cls, "decode_rows", refuse)


def check(backend, enc, rng, as_torch: bool = False, tol: float = 1e-6):
    """linear and linear_grad_input agree with the decoded weight (≤ tol) for batch 1 and 5."""
    rows, cols = enc.matrix_shape
    dense = _DECODE_ROWS(enc.codec, enc, 0, rows).astype(np.float64)
    for n in (1, 5):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        g = rng.standard_normal((n, rows)).astype(np.float32)
        xin, gin = (torch.from_numpy(x), torch.from_numpy(g)) if as_torch else (x, g)
        y, gi = backend.linear(xin, enc), backend.linear_grad_input(gin, enc)
        assert isinstance(y, torch.Tensor) == as_torch and tuple(y.shape) == (n, rows)
        assert tuple(gi.shape) == (n, cols)
        y, gi = (np.asarray(y.cpu()), np.asarray(gi.cpu())) if as_torch else (y, gi)
        assert rel(y, x @ dense.T) <= tol
        assert rel(gi, g @ dense) <= tol


def test_layout_is_recognised_exactly():
    enc = encoded(4, (64, 576))
    assert had.native(enc) and had.default_supported()
    cols_p, signs, blocks, levels = had.layout(enc)
    assert cols_p == 576 and blocks == [512, 64] and signs.dtype == np.float32
    np.testing.assert_array_equal(levels, np.arange(16) - 7.5)
    normal = encoded(4, (64, 576), grid="normal")
    assert had.native(normal)
    np.testing.assert_array_equal(had.layout(normal)[3], normal.codec.levels())
    assert not np.array_equal(normal.codec.levels(), levels)
    extra = attrs.evolve(enc, payload={**enc.payload, "residual": np.zeros(3, np.float32)})
    assert not had.native(extra)  # an extended payload stays on the generic path
    wrong = attrs.evolve(enc, payload={**enc.payload, "row_scale": enc.payload["row_scale"].astype(np.float64)})
    assert not had.native(wrong)
    for name in ("numpy", "torch") + (("cffi",) if CFFI_OK else ()):
        assert rbe_core.get_backend(name).supports("hadamard")


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numpy_native(bits, shape, grid, rng, no_decode):
    check(rbe_core.get_backend("numpy"), encoded(bits, shape, grid=grid), rng)


@pytest.fixture(params=list(cffi_ops.ISAS))
def isa(request, monkeypatch):
    if not CFFI_OK or request.param not in cffi_ops.supported_isas():
        pytest.skip(f"cffi path {request.param} not usable here")
    monkeypatch.setenv(cffi_ops.ISA_ENV, request.param)
    return request.param


@needs_cffi
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cffi_every_isa(isa, bits, shape, grid, rng, no_decode):
    backend = rbe_core.get_backend("cffi")
    check(backend, encoded(bits, shape, grid=grid), rng)
    check(backend, encoded(bits, shape, grid=grid), rng, as_torch=True)  # CPU tensors: the direct path


@needs_cffi
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("group_size", [16, 32, 128])
def test_cffi_group_sizes(isa, group_size, grid, rng, no_decode):
    check(rbe_core.get_backend("cffi"), encoded(4, (21, 300), group_size, grid), rng)


@needs_cffi
def test_cffi_threads_do_not_change_results(monkeypatch, rng, no_decode):
    enc = encoded(4, (301, 1000))
    backend = rbe_core.get_backend("cffi")
    for n in (1, 4):
        x = rng.standard_normal((n, 1000)).astype(np.float32)
        g = rng.standard_normal((n, 301)).astype(np.float32)
        results = []
        for threads in ("1", "2", "3"):
            monkeypatch.setenv(cffi_ops.THREADS_ENV, threads)
            results.append((backend.linear(x, enc), backend.linear_grad_input(g, enc)))
        for y, gi in results[1:]:
            np.testing.assert_array_equal(y, results[0][0])
            np.testing.assert_array_equal(gi, results[0][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_native(device, bits, shape, grid, rng, no_decode):
    backend = rbe_core.get_backend("torch" if device == "cpu" else "cuda")
    check(backend, encoded(bits, shape, grid=grid), rng, as_torch=True, tol=1e-5)  # GPU matmuls: looser


@pytest.mark.parametrize("bits", [3, 4])
def test_torch_small_budget_and_exact_decode(monkeypatch, bits, rng):
    enc = encoded(bits, (37, 100))
    monkeypatch.setenv(torch_ops.CHUNK_ENV, str(3 * 128 * 4 / (1 << 20)))  # a few rows per chunk
    assert len(torch_ops.row_steps(37, 128, torch.device("cpu"))) > 5
    check(rbe_core.get_backend("torch"), enc, rng, as_torch=True)
    decoded = rbe_core.get_backend("torch").decode(enc)
    assert rel(decoded.numpy(), _DECODE_ROWS(enc.codec, enc, 0, 37)) <= 1e-6


def test_unknown_layout_falls_back_and_agrees(rng):
    enc = encoded(4, (37, 100))
    extra = attrs.evolve(enc, payload={**enc.payload, "residual": np.zeros(3, np.float32)})
    names = ("numpy", "torch") + (("cffi",) if CFFI_OK else ())
    for name in names:
        check(rbe_core.get_backend(name), extra, rng)
