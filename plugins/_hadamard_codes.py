"""Bit packing of the ``hadamard`` codec's codes (``bits``-bit little-endian streams, one per row).

Shared by the codec (``hadamard.py``) and its training form (``torch_forms_hadamard.py``); numpy only.
"""

from __future__ import annotations

import numpy as np


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (rows, n) < 2**bits -> uint8 (rows, ceil(n*bits/8)), little-endian bit streams."""
    rows, n = q.shape
    if 8 % bits == 0:  # whole codes per byte: code k of a byte sits at bits k*bits.. (same stream)
        per = 8 // bits
        padded = np.zeros((rows, -(-n // per) * per), dtype=np.uint8)
        padded[:, :n] = q
        out = np.zeros((rows, padded.shape[1] // per), dtype=np.uint8)
        for k in range(per):
            out |= padded[:, k::per] << np.uint8(k * bits)
        return out
    planes = (q[:, :, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    return np.packbits(planes.reshape(rows, n * bits), axis=1, bitorder="little")


#: Code bits unpacked at a time (one byte each while unpacking): 4 Mi.
UNPACK_CHUNK_BITS = 1 << 22


def unpack_codes(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 (rows, n). Unpacked in row chunks, so the temporary
    bit arrays (``bits`` bytes a code) stay within ``UNPACK_CHUNK_BITS`` (a 49152-row embedding
    at once took 226 MB)."""
    out = np.empty((packed.shape[0], n), dtype=np.uint8)
    if 8 % bits == 0:  # whole codes per byte: shifts and a mask, no bit arrays
        per, mask = 8 // bits, np.uint8((1 << bits) - 1)
        for k in range(per):
            out[:, k::per] = (packed[:, : -(-(n - k) // per)] >> np.uint8(k * bits)) & mask
        return out
    weights = np.arange(bits, dtype=np.uint8)
    step = max(1, UNPACK_CHUNK_BITS // max(1, n * bits))
    for start in range(0, packed.shape[0], step):
        flat = np.unpackbits(packed[start : start + step], axis=1, count=n * bits, bitorder="little")
        out[start : start + step] = (flat.reshape(-1, n, bits) << weights).sum(axis=2, dtype=np.uint8)
    return out
