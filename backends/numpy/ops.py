"""Reference kernels in numpy: row-chunked decode inside the matmul, for every codec.

Each chunk of weight rows is decoded with ``Codec.decode_rows`` and multiplied at once, so the
whole float32 weight never exists in memory (at most ``CHUNK_ELEMENTS`` decoded weights do).
``hadamard`` payloads of the known layout take the native path in :mod:`.hadamard` instead
(input rotated once, codes multiplied in the rotated basis).
"""

from __future__ import annotations

import numpy as np

from rbe_core.abc import Encoded
from rbe_core.arrays import row_chunks

from . import hadamard


def linear(x: np.ndarray, encoded: Encoded) -> np.ndarray:
    """(n, in) @ W.T -> (n, out)."""
    if hadamard.native(encoded):
        return hadamard.linear(x, encoded)
    rows, cols = encoded.matrix_shape
    out = np.empty((x.shape[0], rows), dtype=np.float32)
    for start, stop in row_chunks(rows, cols):
        out[:, start:stop] = x @ encoded.decode_rows(start, stop).T
    return out


def grad_input(grad_out: np.ndarray, encoded: Encoded) -> np.ndarray:
    """(n, out) @ W -> (n, in)."""
    if hadamard.native(encoded):
        return hadamard.grad_input(grad_out, encoded)
    rows, cols = encoded.matrix_shape
    out = np.zeros((grad_out.shape[0], cols), dtype=np.float32)
    for start, stop in row_chunks(rows, cols):
        out += grad_out[:, start:stop] @ encoded.decode_rows(start, stop)
    return out
