"""The cffi backend: agreement with numpy on every ISA path, threads, GIL release, failure modes."""

from __future__ import annotations

import importlib
import platform
import sys
import threading
import time

import attrs
import numpy as np
import pytest
import torch

import rbe_core
from rbe_backends.cffi import CffiBackend, library, ops
from rbe_core.errors import BackendUnavailableError

_OK, _REASON = CffiBackend.availability()
pytestmark = pytest.mark.skipif(not _OK, reason=f"cffi backend unavailable: {_REASON}")

ISAS = list(library.ISAS)
CODECS = [
    ("int8", {}),
    ("int4", {}),
    ("int4", {"group_size": 32}),
    ("int4", {"group_size": 2}),
    ("int4", {"group_size": 48}),
    ("int4", {"group_size": 128}),
    ("hadamard", {"bits": 3}),
    ("hadamard", {"bits": 4, "grid": "normal", "group_size": 32}),
    ("raw", {}),
]
#: float32 agreement; a rotated (hadamard) input reorders the sums a little more
TOL = 5e-6
SHAPES = [(1, 1), (3, 5), (7, 33), (37, 101), (130, 257), (17, 600)]


def rel(a, b) -> float:
    """Relative error in the Frobenius norm: the agreement measure the backend promises (<= TOL)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def encode(codec_id, params, shape, rng):
    w = rng.standard_normal(shape).astype(np.float32)
    return rbe_core.get_codec({"id": codec_id, **params}).encode(w)


@pytest.fixture
def cffi():
    return rbe_core.get_backend("cffi")


@pytest.fixture
def numpy_ref():
    return rbe_core.get_backend("numpy")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Force each ISA path in turn; skip the ones this CPU (or build) cannot run."""
    if request.param not in library.supported_isas():
        pytest.skip(f"{request.param} not usable here (usable: {', '.join(library.supported_isas())})")
    monkeypatch.setenv(library.ISA_ENV, request.param)
    return request.param


def test_registered_with_features(cffi):
    assert isinstance(cffi, CffiBackend) and cffi.name == "cffi"
    entry = rbe_core.registry().lookup("backends", "cffi")
    assert entry.plugin == "cffi"
    feats = CffiBackend.features()
    assert "scalar" in feats and f"active={library.active_isa()}" in feats
    assert set(feats[: len(library.supported_isas())]) <= set(library.ISAS)
    assert cffi.supports(rbe_core.get_codec("int8")) and cffi.supports(rbe_core.get_codec("hadamard")) and not cffi.supports(rbe_core.get_codec("hybrid"))


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="SIMD paths are x86 only")
def test_simd_paths_are_built_on_x86():
    """A per-ISA file that fails to compile leaves a scalar-only module (setup.py only warns):
    on x86 both SIMD paths must be in the build."""
    assert {"avx2", "avx512", "avx512vbmi"} <= set(library.compiled_isas())


def test_forced_isa_is_reported_active(isa):
    assert library.active_isa() == isa
    assert f"active={isa}" in CffiBackend.features()


@pytest.mark.parametrize("codec_id,params", CODECS, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_agrees_with_numpy(isa, cffi, numpy_ref, codec_id, params, shape, rng):
    enc = encode(codec_id, params, shape, rng)
    dense = enc.decode().reshape(enc.matrix_shape).astype(np.float64)
    for n in (1, 2, 5):
        x = rng.standard_normal((n, shape[1])).astype(np.float32)
        y = cffi.linear(x, enc)
        assert y.shape == (n, shape[0]) and y.dtype == np.float32
        assert rel(y, numpy_ref.linear(x, enc)) <= TOL
        assert rel(y, x @ dense.T) <= TOL
        g = rng.standard_normal((n, shape[0])).astype(np.float32)
        gi = cffi.linear_grad_input(g, enc)
        assert gi.shape == (n, shape[1])
        assert rel(gi, numpy_ref.linear_grad_input(g, enc)) <= TOL
        assert rel(gi, g @ dense) <= TOL


@pytest.mark.parametrize("codec_id", ["int8", "int4"])
def test_3d_torch_and_numpy_inputs_with_bias(isa, cffi, numpy_ref, codec_id, rng):
    enc = encode(codec_id, {}, (45, 70), rng)
    x = rng.standard_normal((2, 3, 70)).astype(np.float32)
    bias = rng.standard_normal(45).astype(np.float32)
    y = cffi.linear(x, enc, bias)
    assert y.shape == (2, 3, 45) and rel(y, numpy_ref.linear(x, enc, bias)) <= TOL
    xt = torch.from_numpy(x).double()
    yt = cffi.linear(xt, enc, torch.from_numpy(bias))
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float64 and yt.shape == (2, 3, 45)
    assert rel(yt.numpy(), y) <= TOL
    g = torch.randn(4, 1, 45)
    gi = cffi.linear_grad_input(g, enc)
    assert isinstance(gi, torch.Tensor) and gi.shape == (4, 1, 70)
    assert rel(gi.numpy(), numpy_ref.linear_grad_input(g.numpy(), enc)) <= TOL


@pytest.mark.parametrize("codec_id,params", CODECS, ids=lambda v: str(v))
def test_grad_input_batch_tiles_and_panels(isa, cffi, numpy_ref, codec_id, params, rng):
    """Batches beyond one register tile (full tiles and a tail), several row panels, ragged columns."""
    enc = encode(codec_id, params, (300, 203), rng)
    dense = enc.decode().reshape(enc.matrix_shape).astype(np.float64)
    for n in (8, 19, 31):
        g = rng.standard_normal((n, 300)).astype(np.float32)
        gi = cffi.linear_grad_input(g, enc)
        assert gi.shape == (n, 203)
        assert rel(gi, numpy_ref.linear_grad_input(g, enc)) <= TOL
        assert rel(gi, g @ dense) <= TOL


def test_empty_batch(cffi, rng):
    enc = encode("int4", {}, (9, 20), rng)
    assert cffi.linear(np.zeros((0, 20), np.float32), enc).shape == (0, 9)
    assert cffi.linear_grad_input(np.zeros((0, 9), np.float32), enc).shape == (0, 20)


def test_float16_subnormal_scales(cffi, numpy_ref, isa, rng):
    # a tiny range per group makes float16 scales (and minima) subnormal
    w = (1e-6 * rng.standard_normal((6, 96))).astype(np.float32)
    enc = rbe_core.get_codec("int4").encode(w)
    assert (np.abs(enc.payload["scale"].astype(np.float32)) < 6.1e-5).any()
    x = rng.standard_normal((1, 96)).astype(np.float32)
    assert rel(cffi.linear(x, enc), numpy_ref.linear(x, enc)) <= TOL
    x = rng.standard_normal((3, 96)).astype(np.float32)
    assert rel(cffi.linear(x, enc), numpy_ref.linear(x, enc)) <= TOL


@pytest.mark.parametrize("codec_id", ["int8", "int4"])
def test_threads_split_work_without_changing_results(monkeypatch, cffi, numpy_ref, codec_id, rng):
    monkeypatch.setattr(library, "WAKE_WORK", 1000)  # split even this small product
    enc = encode(codec_id, {}, (301, 1000), rng)
    for n in (1, 4):
        x = rng.standard_normal((n, 1000)).astype(np.float32)
        g = rng.standard_normal((n, 301)).astype(np.float32)
        results = []
        for threads in ("1", "2", "3"):
            monkeypatch.setenv(library.THREADS_ENV, threads)
            results.append((cffi.linear(x, enc), cffi.linear_grad_input(g, enc)))
        for y, gi in results[1:]:  # each output element is computed by exactly one thread
            np.testing.assert_array_equal(y, results[0][0])
            np.testing.assert_array_equal(gi, results[0][1])
        assert rel(results[0][0], numpy_ref.linear(x, enc)) <= TOL
        assert rel(results[0][1], numpy_ref.linear_grad_input(g, enc)) <= TOL


def test_small_products_stay_on_the_calling_thread(monkeypatch):
    """A product wakes a sleeping worker only when each thread gets ``WAKE_WORK`` multiply-adds."""
    monkeypatch.setenv(library.THREADS_ENV, "3")
    assert library.threads_for(576 * 576) == 1  # SmolLM2's projections at batch 1
    assert library.threads_for(2 * library.WAKE_WORK) == 2
    assert library.threads_for(4096 * 4096) == 3  # never more than asked for
    monkeypatch.setenv(library.THREADS_ENV, "1")
    assert library.threads_for(4096 * 4096 * 64) == 1


def test_gil_is_released_during_a_kernel(monkeypatch, cffi, rng):
    monkeypatch.setenv(library.ISA_ENV, "scalar")
    monkeypatch.setenv(library.THREADS_ENV, "1")
    enc = encode("int8", {}, (512, 512), rng)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    start = time.perf_counter()
    cffi.linear(x, enc)
    once = time.perf_counter() - start
    reps = max(1, int(0.15 / max(once, 1e-6)))  # one C call of about 150 ms
    x = np.ascontiguousarray(np.tile(x, (reps, 1)))
    window = []

    def work():
        window.append(time.perf_counter())
        cffi.linear(x, enc)
        window.append(time.perf_counter())

    worker = threading.Thread(target=work)
    stamps = []
    worker.start()
    while worker.is_alive():  # this loop can only run during the call if the call dropped the GIL
        stamps.append(time.perf_counter())
    worker.join()
    t0, t1 = window
    margin = 0.1 * (t1 - t0)  # >> the 5 ms switch interval around entering and leaving C
    inside = [t for t in stamps if t0 + margin < t < t1 - margin]
    assert len(inside) >= 3, (t1 - t0, len(stamps), len(inside))


def test_other_codecs_use_the_generic_path(cffi, numpy_ref, rng):
    enc = encode("hybrid", {}, (13, 64), rng)
    assert not cffi.supports(rbe_core.get_codec("hybrid")) and cffi.path(enc) == "generic" and ops.matrix(enc) is None
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(cffi.linear(x, enc), numpy_ref.linear(x, enc))


def test_inconsistent_payload_is_rejected_before_c(cffi, rng):
    enc = encode("int4", {"group_size": 2}, (8, 50), rng)  # 50 columns: codes in pairs (``q``)
    bad = attrs.evolve(enc, payload={**enc.payload, "q": enc.payload["q"][:, :-1]})
    with pytest.raises(ValueError, match="lowered step"):  # 48 codes wide: 24 groups, not 25
        cffi.linear(np.ones((1, 50), np.float32), bad)
    enc = encode("int4", {}, (8, 64), rng)  # 64 columns: nibble blocks
    bad = attrs.evolve(enc, payload={**enc.payload, "nibbles": enc.payload["nibbles"][:, :-1]})
    with pytest.raises(ValueError, match="nibbles"):
        cffi.linear(np.ones((1, 64), np.float32), bad)
    enc8 = encode("int8", {}, (8, 64), rng)
    bad = attrs.evolve(
        enc8, payload={**enc8.payload, "scale": enc8.payload["scale"].astype(np.float64)}
    )
    with pytest.raises(ValueError, match="lowered step"):
        cffi.linear_grad_input(np.ones((1, 8), np.float32), bad)


def test_bad_isa_or_threads_setting_is_explained(monkeypatch, cffi, rng):
    enc = encode("int8", {}, (4, 8), rng)
    monkeypatch.setenv(library.ISA_ENV, "neon")
    ok, reason = CffiBackend.availability()
    assert not ok and "RBE_CFFI_ISA='neon'" in reason
    with pytest.raises(ValueError, match="expected one of"):
        cffi.linear(np.ones((1, 8), np.float32), enc)
    missing = [name for name in library.ISAS if name not in library.supported_isas()]
    if missing:
        monkeypatch.setenv(library.ISA_ENV, missing[0])
        ok, reason = CffiBackend.availability()
        assert not ok and reason.startswith(f"{library.ISA_ENV}={missing[0]}:")
    monkeypatch.setenv(library.ISA_ENV, "scalar")
    monkeypatch.setenv(library.THREADS_ENV, "zero")
    with pytest.raises(ValueError, match="RBE_CFFI_THREADS"):
        cffi.linear(np.ones((1, 8), np.float32), enc)


def test_missing_compiled_module_fails_on_call_not_import(monkeypatch, rng):
    enc = encode("int8", {}, (4, 8), rng)
    monkeypatch.setitem(sys.modules, "rbe_backends.cffi._kernels", None)  # import now fails
    try:
        importlib.reload(library)
        assert library.lib is None
        ok, reason = CffiBackend.availability()
        assert not ok and "rbe_backends.cffi._kernels" in reason and "C compiler" in reason
        assert CffiBackend.features() == ()
        with pytest.raises(BackendUnavailableError, match="cannot be imported"):
            CffiBackend().linear(np.ones((1, 8), np.float32), enc)
    finally:
        monkeypatch.undo()
        importlib.reload(library)
    assert library.lib is not None and CffiBackend.availability() == (True, "")
