"""Native ``hadamard`` path in numpy, and the layout check every backend's hadamard kernel uses.

``x @ W.T == rotate(pad(x)) @ W_rot.T`` (see ``rbe_plugins.hadamard``): the input is rotated once
per call with the codec's own FWHT (O(cols log cols) per row), then multiplied by chunks of the
rotated weight ``levels[q] * step`` decoded from the packed codes, never the whole matrix.
``grad_input`` is ``(g @ W_rot)`` followed by the inverse rotation. A payload is handled only
when :func:`native` recognises its codec config and fields exactly; anything else (a changed or
extended layout) stays on the generic ``decode_rows`` path.
"""

from __future__ import annotations

import functools
import weakref

import numpy as np

from rbe_core.abc import Encoded
from rbe_core.arrays import row_chunks

CODEC_ID = "hadamard"
#: The codec config keys and payload fields these kernels implement.
CONFIG_KEYS = frozenset({"id", "bits", "group_size", "max_block", "seed", "damp", "act_order", "grid"})
FIELDS = frozenset({"codes", "scale_code", "row_scale"})

#: Per encoded tensor: its checked layout, or None (checked once; payloads are not mutated).
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _module():
    from rbe_plugins import hadamard

    return hadamard


def layout(encoded: Encoded) -> tuple[int, np.ndarray, list[int], np.ndarray] | None:
    """(cols_p, signs float32, Hadamard blocks, levels float32[2**bits]) when the kernels understand
    ``encoded``, else None."""
    if encoded in _LAYOUTS:
        return _LAYOUTS[encoded]
    _LAYOUTS[encoded] = found = _check_layout(encoded)
    return found


def _check_layout(encoded: Encoded) -> tuple[int, np.ndarray, list[int], np.ndarray] | None:
    codec = encoded.codec
    if codec.codec_id != CODEC_ID or set(codec.get_config()) != CONFIG_KEYS:
        return None
    if set(encoded.payload) != FIELDS or not hasattr(codec, "layout") or not hasattr(codec, "levels"):
        return None
    bits, gs = int(codec.bits), int(codec.group_size)
    rows, cols = encoded.matrix_shape
    cols_p, signs, blocks = codec.layout(cols)
    levels = np.ascontiguousarray(codec.levels(), dtype=np.float32)
    if not 2 <= bits <= 8 or cols_p % gs or sum(blocks) != cols_p or len(signs) != cols_p or len(levels) != 2**bits:
        return None
    p = encoded.payload
    expect = {
        "codes": ((rows, -(-cols_p * bits // 8)), np.uint8),
        "scale_code": ((rows, cols_p // gs), np.uint8),
        "row_scale": ((rows,), np.float32),
    }
    for field, (shape, dtype) in expect.items():
        if tuple(p[field].shape) != shape or p[field].dtype != dtype:
            return None
    return cols_p, np.ascontiguousarray(signs, dtype=np.float32), [int(b) for b in blocks], levels


def native(encoded: Encoded) -> bool:
    """True when ``encoded`` is a hadamard payload these kernels implement exactly."""
    return encoded.codec.codec_id == CODEC_ID and layout(encoded) is not None


@functools.cache
def default_supported() -> bool:
    """Whether the installed codec's default config produces a layout these kernels handle."""
    try:
        from rbe_core import get_codec

        enc = get_codec({"id": CODEC_ID}).encode(np.ones((2, 8), dtype=np.float32))
    except Exception:  # codec missing or broken: nothing to claim
        return False
    return native(enc)


def unpack(codes: np.ndarray, n: int, bits: int) -> np.ndarray:
    """uint8 codes (rows, n) from little-endian bit streams; fast paths for 8, 4 and 2 bits."""
    if bits == 8:
        return codes[:, :n]
    if bits in (4, 2):
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        q = (codes[:, :, None] >> shifts) & np.uint8((1 << bits) - 1)
        return q.reshape(codes.shape[0], -1)[:, :n]
    return _module().unpack_codes(codes, n, bits)


def rotated_rows(encoded: Encoded, start: int, stop: int, cols_p: int, levels: np.ndarray) -> np.ndarray:
    """Rows ``start:stop`` of ``W_rot`` (float32, cols_p wide): exactly decode's arithmetic."""
    codec, p = encoded.codec, encoded.payload
    bits, gs = int(codec.bits), int(codec.group_size)
    q = unpack(p["codes"][start:stop], cols_p, bits)
    w = levels[q].reshape(stop - start, cols_p // gs, gs)
    step = p["row_scale"][start:stop, None] * p["scale_code"][start:stop].astype(np.float32)
    w *= step[:, :, None]
    return w.reshape(stop - start, cols_p)


def rotate_input(x: np.ndarray, cols_p: int, signs: np.ndarray, blocks: list[int]) -> np.ndarray:
    """``pad(x) @ R.T`` (float32, (n, cols_p))."""
    xp = np.zeros((x.shape[0], cols_p), dtype=np.float32)
    xp[:, : x.shape[1]] = x
    return _module().rotate(xp, signs, blocks)


def linear(x: np.ndarray, encoded: Encoded) -> np.ndarray:
    """(n, in) @ W.T -> (n, out) for a :func:`native` payload."""
    cols_p, signs, blocks, levels = layout(encoded)
    rows = encoded.matrix_shape[0]
    xr = rotate_input(np.asarray(x, dtype=np.float32), cols_p, signs, blocks)
    out = np.empty((x.shape[0], rows), dtype=np.float32)
    for start, stop in row_chunks(rows, cols_p):
        out[:, start:stop] = xr @ rotated_rows(encoded, start, stop, cols_p, levels).T
    return out


def grad_input(grad_out: np.ndarray, encoded: Encoded) -> np.ndarray:
    """(n, out) @ W -> (n, in) for a :func:`native` payload: ``unrotate(g @ W_rot)[:, :in]``."""
    cols_p, signs, blocks, levels = layout(encoded)
    rows, cols = encoded.matrix_shape
    acc = np.zeros((grad_out.shape[0], cols_p), dtype=np.float32)
    for start, stop in row_chunks(rows, cols_p):
        acc += grad_out[:, start:stop] @ rotated_rows(encoded, start, stop, cols_p, levels)
    return np.ascontiguousarray(_module().unrotate(acc, signs, blocks)[:, :cols])
