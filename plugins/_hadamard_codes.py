"""Bit packing of the ``hadamard`` codec's codes (``bits``-bit little-endian streams, one per row).

Shared by the codec (``hadamard.py``) and its training form (``torch_forms_hadamard.py``); numpy only.
"""

from __future__ import annotations

import numpy as np


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (rows, n) < 2**bits -> uint8 (rows, ceil(n*bits/8)), little-endian bit streams."""
    rows, n = q.shape
    planes = (q[:, :, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    return np.packbits(planes.reshape(rows, n * bits), axis=1, bitorder="little")


def unpack_codes(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 (rows, n)."""
    rows = packed.shape[0]
    flat = np.unpackbits(packed, axis=1, count=n * bits, bitorder="little").reshape(rows, n, bits)
    return (flat << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)
