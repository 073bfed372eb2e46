"""Orthonormal block transforms (DCT-II, Haar) and the geometry basis used by ``hybrid``.

All matrices are float64 and cached per size; a block X (B x B) transforms as ``T @ X @ T.T`` and
comes back as ``T.T @ C @ T``.
"""

from __future__ import annotations

import functools

import numpy as np

from rbe_core.abc import Geometry


@functools.lru_cache(maxsize=16)
def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix of size n (rows are frequencies)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    m.setflags(write=False)
    return m


@functools.lru_cache(maxsize=16)
def haar_matrix(n: int) -> np.ndarray:
    """Orthonormal full-depth Haar wavelet matrix of size n (a power of two)."""
    if n & (n - 1):
        raise ValueError(f"Haar needs a power-of-two size, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        m = h.shape[0]
        top = np.kron(h, [1.0, 1.0])
        bottom = np.kron(np.eye(m), [1.0, -1.0])
        h = np.vstack([top, bottom]) / np.sqrt(2.0)
    h.setflags(write=False)
    return h


TRANSFORMS = {"dct": dct_matrix, "haar": haar_matrix}


def transform_matrix(name: str, n: int) -> np.ndarray:
    return TRANSFORMS[name](n)


#: number of geometry basis functions per block (see :func:`geometry_basis`).
N_BASIS = 9


@functools.lru_cache(maxsize=32)
def _basis_cached(geometry: Geometry, n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n) + 0.5) / n * 2.0 - 1.0  # pixel centres in [-1, 1]
    y, x = np.meshgrid(c, c, indexing="ij")
    rho = np.hypot(x, y)
    phi = np.arctan2(y, x)
    fc, fs = geometry.basis(rho, phi)
    cols = [np.ones_like(x), x, y, x * y, x * x, y * y, geometry.radial(rho), fc, fs]
    a = np.stack([v.ravel() for v in cols], axis=1)
    pinv = np.linalg.pinv(a)
    a.setflags(write=False)
    pinv.setflags(write=False)
    return a, pinv


def geometry_basis(geometry: Geometry, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, pinv(A)) with A (n*n, N_BASIS): 1, x, y, xy, x², y², f(ρ), f(ρ)cos φ, f(ρ)sin φ.

    ``x, y`` are the block's pixel centres in [-1, 1], ``ρ, φ`` their polar coordinates and ``f``
    the geometry's radial function.
    """
    return _basis_cached(geometry, n)
