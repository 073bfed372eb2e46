"""GPTQ (Frantar et al., 2022): calibrated rounding onto any scalar grid, and its use for every
codec that lowers and lifts (``Codec.lower`` + ``Codec.from_lowered``)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import numpy as np

from ..abc import Encoded
from ..arrays import row_chunks
from ..errors import InvalidWeightError
from ..native.lowering import lower, nearest_codes

#: Columns per lazy-update block, and per sub-block inside it.
_GPTQ_BLOCK = 128
_GPTQ_SUB = 16
#: rows × columns² from which a matrix's rows are split over threads (a 2048 × 2048 matrix and up).
_PARALLEL_WORK = 1 << 33
#: Dampening of the Hessian's diagonal (fraction of its mean) for codecs that do not set one.
DEFAULT_DAMP = 0.01


def gptq(w: np.ndarray, steps: np.ndarray, h: np.ndarray, levels: np.ndarray,
         nearest: Callable[[np.ndarray], np.ndarray], damp: float, act_order: bool) -> np.ndarray:
    """GPTQ codes (uint8, rows × n) for weights ``w`` (rows, n) on the grid ``levels[q] * steps``
    (per-element ``steps``; ``nearest(u)`` gives the codes of the levels nearest ``u``, in steps)
    against the Hessian ``h``: :func:`gptq_sweep` of :func:`hessian_factor`."""
    return gptq_sweep(w, steps, hessian_factor(h, damp, act_order), levels, nearest)


@attrs.frozen(eq=False)
class HessianFactor:
    """What GPTQ needs of a Hessian: the column order, the columns no input reaches, and the upper
    Cholesky factor ``U`` of the (dampened, reordered) inverse."""

    perm: np.ndarray
    dead: np.ndarray
    u: np.ndarray


def hessian_factor(h: np.ndarray, damp: float, act_order: bool) -> HessianFactor:
    """The :class:`HessianFactor` of ``h`` (n × n): columns in decreasing ``diag(h)`` order when
    ``act_order``, ``damp`` × the mean diagonal added to the diagonal. Needs no weights, so it can
    run beside the weights' own preparation (``hadamard`` does)."""
    n = len(h)
    h = h.copy()
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(n)
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(n)] += damp * float(np.mean(np.diag(h)))
    return HessianFactor(perm, dead, inverse_cholesky_upper(h))


def gptq_sweep(w: np.ndarray, steps: np.ndarray, factor: HessianFactor, levels: np.ndarray,
               nearest: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """GPTQ's rounding with a :class:`HessianFactor`: minimises ``tr((W - Ŵ) H (W - Ŵ)ᵀ)``
    greedily column by column, propagating each column's rounding error to the not-yet-quantized
    columns through ``U`` (blocks of ``_GPTQ_BLOCK`` columns, lazy batch updates). BLAS runs
    single-threaded so the codes never depend on how many threads the BLAS library used (which
    changes with load, and between a driver and a Ray worker): conversions are reproducible bit for
    bit. Matrices are encoded in parallel instead (``jobs``), and large ones split their rows."""
    with single_threaded_blas():
        return _gptq_sweep(w, steps, factor, np.asarray(levels, dtype=np.float64), nearest)


_BLAS_LOCK = threading.Lock()
_BLAS_STATE: dict[str, Any] = {"depth": 0, "limiter": None}


@contextlib.contextmanager
def single_threaded_blas():
    """BLAS limited to one thread while any thread of this process is inside (threadpoolctl's
    limits are process-wide: the first entrant sets it, the last one out restores it)."""
    from threadpoolctl import threadpool_limits

    with _BLAS_LOCK:
        if _BLAS_STATE["depth"] == 0:
            _BLAS_STATE["limiter"] = threadpool_limits(limits=1, user_api="blas")
        _BLAS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_STATE["depth"] -= 1
            if _BLAS_STATE["depth"] == 0:
                _BLAS_STATE["limiter"].restore_original_limits()
                _BLAS_STATE["limiter"] = None


def _gptq_sweep(w, steps, factor, levels, nearest) -> np.ndarray:
    rows, n = w.shape
    w, s = _permuted(w, factor.perm), _permuted(steps, factor.perm)
    w[:, factor.dead[factor.perm]] = 0.0
    q = np.empty((rows, n), dtype=np.uint8)
    parts = [slice(a, b) for a, b in row_parts(rows, n)]
    if len(parts) == 1:
        _gptq_rows(w, s, factor.u, levels, nearest, q)
    else:  # rows are independent given U: each part on its own thread (numpy releases the GIL)
        with ThreadPoolExecutor(len(parts)) as pool:
            list(pool.map(lambda r: _gptq_rows(w[r], s[r], factor.u, levels, nearest, q[r]), parts))
    out = np.empty_like(q)
    out[:, factor.perm] = q
    return out


def _permuted(a: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """``a[:, perm]`` as a new float64 array, filled in row chunks (no full-size temporary)."""
    out = np.empty((a.shape[0], len(perm)), dtype=np.float64)
    for r0, r1 in row_chunks(a.shape[0], len(perm)):
        out[r0:r1] = a[r0:r1][:, perm]
    return out


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """The upper-triangular ``U`` with ``H⁻¹ = Uᵀ U`` (positive diagonal) of a positive definite
    ``h``, without inverting ``h``: with ``J`` the reversal, ``J H J = M Mᵀ`` (Cholesky) gives
    ``U = J M⁻¹ J``; ``M⁻¹`` comes from :func:`_inverse_cholesky` (within 1e-9 of Cholesky of
    ``inv(h)``). Its matrix products run two at a time on single-threaded BLAS: a fixed
    computation whatever the thread count, so the codes never depend on it."""
    with ThreadPoolExecutor(2) as pool, single_threaded_blas():
        inv = _inverse_cholesky(np.ascontiguousarray(h[::-1, ::-1]), pool)
    return np.ascontiguousarray(inv[::-1, ::-1])


#: Order up to which :func:`_inverse_cholesky` factors directly (LAPACK).
_DIRECT_CHOLESKY = 256


def _inverse_cholesky(a: np.ndarray, pool: ThreadPoolExecutor) -> np.ndarray:
    """``L⁻¹`` of the Cholesky factor ``L`` (``a = L Lᵀ``), by halves: with ``L₁₁⁻¹`` of the
    leading block, ``L₂₁ = A₂₁ L₁₁⁻ᵀ``, then ``L₂₂⁻¹`` of ``A₂₂ − L₂₁ L₂₁ᵀ`` and
    ``(L⁻¹)₂₁ = −L₂₂⁻¹ L₂₁ L₁₁⁻¹``: matrix products do the work (4/3 n³ multiply-adds)."""
    n = len(a)
    if n <= _DIRECT_CHOLESKY:
        return np.tril(np.linalg.inv(np.linalg.cholesky(a)))
    k = n // 2
    i11 = _inverse_cholesky(a[:k, :k], pool)
    l21 = _product(a[k:, :k], i11.T, pool)
    i22 = _inverse_cholesky(a[k:, k:] - _product(l21, l21.T, pool), pool)
    out = np.zeros_like(a)
    out[:k, :k], out[k:, k:] = i11, i22
    out[k:, :k] = _product(i22, _product(l21, i11, pool), pool)
    np.negative(out[k:, :k], out=out[k:, :k])
    return out


def _product(a: np.ndarray, b: np.ndarray, pool: ThreadPoolExecutor) -> np.ndarray:
    """``a @ b`` as two products of ``a``'s row halves, on two threads."""
    k = len(a) // 2
    top, bottom = pool.map(lambda rows: a[rows] @ b, (slice(0, k), slice(k, None)))
    return np.concatenate((top, bottom))


def row_parts(rows: int, n: int) -> list[tuple[int, int]]:
    """Row ranges GPTQ runs in parallel: one per CPU for matrices of at least ``_PARALLEL_WORK``
    (rows × columns²), in multiples of 64 rows (their codes do not depend on the split: every
    step is row-wise, and each row's products see the same operands)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    k = min(cpus, rows // 64) if rows * n * n >= _PARALLEL_WORK else 1
    if k <= 1:
        return [(0, rows)]
    size = -(-rows // (64 * k)) * 64
    return [(a, min(rows, a + size)) for a in range(0, rows, size)]


def _gptq_rows(w, s, u, levels, nearest, q) -> None:
    """The column sweep of :func:`gptq_sweep` over some rows: ``w`` (updated in place), their steps
    ``s``, the shared factor ``u``; codes into ``q``. Each block is held transposed
    (a column is a contiguous row), and inside it errors reach the later columns in sub-blocks of
    ``_GPTQ_SUB`` by one matrix product each (1.9–2.4× the column-by-column updates, same codes on
    the matrices measured)."""
    n = w.shape[1]
    for i1 in range(0, n, _GPTQ_BLOCK):
        i2 = min(i1 + _GPTQ_BLOCK, n)
        wt, st = (np.ascontiguousarray(a[:, i1:i2].T) for a in (w, s))
        safet = np.where(st > 0, st, 1.0)
        et = np.empty_like(wt)
        qt = np.empty(wt.shape, dtype=np.uint8)
        u1 = u[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, _GPTQ_SUB):
            j2 = min(j1 + _GPTQ_SUB, i2 - i1)
            for i in range(j1, j2):
                qt[i] = qi = nearest(wt[i] / safet[i])
                et[i] = e = (wt[i] - levels[qi] * st[i]) / u1[i, i]
                wt[i + 1 : j2] -= np.outer(u1[i, i + 1 : j2], e)
            wt[j2:] -= u1[j1:j2, j2:].T @ et[j1:j2]
        q[:, i1:i2] = qt.T
        w[:, i2:] -= et.T @ u[i1:i2, i2:]


def transformed_hessian(gram, cols: int, cols_p: int, transform) -> np.ndarray:
    """The layer Hessian ``XᵀX / n`` of a ``calibration.Gram`` over ``cols`` inputs, padded to
    ``cols_p`` and rotated by ``transform`` (``T H Tᵀ``, a ``HadamardTransform``) unless None."""
    h = np.asarray(gram.hessian, dtype=np.float64)
    if h.shape != (cols, cols) or not np.isfinite(h).all():
        raise InvalidWeightError(f"calibration Gram must be a finite ({cols}, {cols}) matrix, got {h.shape}")
    hp = np.zeros((cols_p, cols_p), dtype=np.float64)
    hp[:cols, :cols] = h
    return hp if transform is None else transform.sandwich(hp)


def lowered_hessian(gram, low) -> np.ndarray:
    """:func:`transformed_hessian` in ``low``'s basis (its padding and input transform)."""
    return transformed_hessian(gram, low.cols, low.cols_p, low.transform)


def calibrated_encode(codec, weight, gram, *, source: str = "", damp: float = DEFAULT_DAMP,
                      act_order: bool = True) -> Encoded:
    """``codec.encode(weight)`` with its codes re-chosen by GPTQ against ``gram``'s Hessian, on
    the codec's own lowered grid (its level table, steps and offsets, in the transformed basis),
    written back with ``codec.from_lowered``. A tensor whose lowering is not a coded grid (dense,
    or none) is returned as plainly encoded."""
    enc = codec.encode(weight, source=source)
    low = lower(enc, cache=False)
    if low is None or low.bits == 32:
        return enc
    target = low.unrotated_target(np.asarray(weight, dtype=np.float32))
    col_group = np.arange(low.cols_p) // low.group_size
    steps = low.step[:, col_group]
    if low.offset is not None:
        target = target - low.offset[:, col_group]
    codes = gptq(target, steps, lowered_hessian(gram, low), low.levels,
                 lambda u: nearest_codes(low.levels, u), damp, act_order)
    return codec.from_lowered(enc, low.with_values(codes=codes))
