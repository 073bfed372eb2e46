"""GPTQ's factorisation and its row-parallel sweep (rbe_core/compression/gptq.py)."""

from __future__ import annotations

import numpy as np
import pytest

from rbe_core.compression import gptq as gptq_module
from rbe_core.compression.gptq import gptq, inverse_cholesky_upper
from rbe_core.native.lowering import nearest_codes


def _hessian(rng, n: int) -> np.ndarray:
    x = rng.standard_normal((n + 64, n)) @ (rng.standard_normal((n, n)) / np.sqrt(n))
    h = x.T @ x / len(x)
    h[np.diag_indices(n)] += 0.01 * np.mean(np.diag(h))
    return h


@pytest.mark.parametrize("n", [1, 5, 128, 129, 300])
def test_inverse_cholesky_upper_factors_the_inverse(n):
    h = _hessian(np.random.default_rng(n), n)
    u = inverse_cholesky_upper(h)
    np.testing.assert_array_equal(u, np.triu(u))
    assert (np.diag(u) > 0).all()
    np.testing.assert_allclose(u, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=1e-9, atol=1e-12)


def test_rows_split_over_threads_give_the_same_codes(monkeypatch):
    """Rows are independent given the Hessian: the split over CPUs never changes a code."""
    rng = np.random.default_rng(0)
    rows, n = 200, 96
    w = rng.standard_normal((rows, n))
    steps = np.full((rows, n), 0.3)
    levels = np.arange(16, dtype=np.float32) - 7.5
    h = _hessian(rng, n)
    args = (w, steps, h, levels, lambda u: nearest_codes(levels, u), 0.01, True)
    monkeypatch.setattr(gptq_module, "_PARALLEL_WORK", 1 << 62)
    assert gptq_module.row_parts(rows, n) == [(0, rows)]
    whole = gptq(*args)
    monkeypatch.setattr(gptq_module, "_PARALLEL_WORK", 0)
    monkeypatch.setattr(gptq_module.os, "sched_getaffinity", lambda _pid: {0, 1, 2})
    assert gptq_module.row_parts(rows, n) == [(0, 128), (128, 200)]  # 64-row multiples, a short last part
    np.testing.assert_array_equal(gptq(*args), whole)
