"""The generic path: weights decoded by the codec's own numpy code, row chunk by row chunk.

Backends take it for a codec that neither lowers (``Codec.lower``) nor has a registered
``Kernel``. A codec that implements ``decode_rows`` is decoded ``CHUNK_ELEMENTS`` weights at a
time; one that does not is decoded once per call (the whole float32 weight exists for the call's
duration) instead of once per chunk. ``RBE_DECODED_CACHE_MB=N`` (default 0: off) keeps up to N
MiB of decoded float32 weights between calls, least recently used first out: a generic codec
then costs a plain matmul per call, at 4 bytes per cached weight.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from ..abc import Codec, Encoded
from ..arrays import row_chunks

log = logging.getLogger("rbe")

CACHE_ENV = "RBE_DECODED_CACHE_MB"

_CACHE: OrderedDict[int, tuple[weakref.ref, np.ndarray]] = OrderedDict()
_WARNED: set[str] = set()


def cache_budget() -> int:
    """Bytes of decoded weights kept between calls (``$RBE_DECODED_CACHE_MB``; 0: none)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if not value:
        return 0
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise ValueError(f"{CACHE_ENV}={value!r}: expected a number of MiB >= 0")
    return int(mb * (1 << 20))


def _cached(encoded: Encoded, budget: int) -> np.ndarray:
    key = id(encoded)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is encoded:
        _CACHE.move_to_end(key)
        return hit[1]
    w = np.ascontiguousarray(encoded.decode(), dtype=np.float32).reshape(encoded.matrix_shape)
    if w.nbytes <= budget:
        _CACHE[key] = (weakref.ref(encoded, lambda _r, k=key: _CACHE.pop(k, None)), w)
        while sum(a.nbytes for _r, a in _CACHE.values()) > budget:
            _CACHE.popitem(last=False)
    return w


def decoded_chunks(encoded: Encoded, backend: str) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, float32 rows ``start:stop`` of the (rows, cols) weight) covering every row."""
    codec_id = encoded.codec.codec_id
    if codec_id not in _WARNED:
        _WARNED.add(codec_id)
        log.info("rbe %s backend: codec %r neither lowers nor has a kernel; decoding it with its numpy code "
                 "(the generic path)", backend, codec_id)
    rows, cols = encoded.matrix_shape
    budget = cache_budget()
    if budget or type(encoded.codec).decode_rows is Codec.decode_rows:
        w = _cached(encoded, budget) if budget else np.ascontiguousarray(
            encoded.decode(), dtype=np.float32).reshape(rows, cols)
        yield 0, rows, w
        return
    for start, stop in row_chunks(rows, cols):
        yield start, stop, encoded.decode_rows(start, stop)


def linear(x: np.ndarray, encoded: Encoded, backend: str = "numpy") -> np.ndarray:
    """(n, in) float32 ``@ W.T`` -> (n, out) on the generic path."""
    out = np.empty((x.shape[0], encoded.matrix_shape[0]), dtype=np.float32)
    for start, stop, w in decoded_chunks(encoded, backend):
        out[:, start:stop] = x @ w.T
    return out


def grad_input(grad_out: np.ndarray, encoded: Encoded, backend: str = "numpy") -> np.ndarray:
    """(n, out) float32 ``@ W`` -> (n, in) on the generic path."""
    out = np.zeros((grad_out.shape[0], encoded.matrix_shape[1]), dtype=np.float32)
    for start, stop, w in decoded_chunks(encoded, backend):
        out += grad_out[:, start:stop] @ w
    return out
