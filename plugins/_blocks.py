"""Helpers shared by the built-in codecs: padding, block views, nibble and bit-field packing,
group scales, nearest-level quantization and a thread pool for per-block work.

Nothing here is a plugin; codec modules import these so no logic is repeated between layouts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from rbe_core.errors import InvalidWeightError, RBEFormatError
from rbe_core.native.lowering import pack_nibble_blocks, unpack_nibble_blocks

FLOAT16_MAX = float(np.finfo(np.float16).max)


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def pad_cols(w2: np.ndarray, multiple: int) -> np.ndarray:
    """``w2`` (rows, cols) with zero columns appended up to a multiple of ``multiple``."""
    cols_p = round_up(w2.shape[1], multiple)
    if cols_p == w2.shape[1]:
        return w2
    return np.pad(w2, ((0, 0), (0, cols_p - w2.shape[1])))


def pad_blocks(w2: np.ndarray, block_rows: int, block_cols: int) -> np.ndarray:
    """``w2`` padded by edge replication up to whole blocks (keeps smooth data smooth)."""
    pr = round_up(w2.shape[0], block_rows) - w2.shape[0]
    pc = round_up(w2.shape[1], block_cols) - w2.shape[1]
    if pr == 0 and pc == 0:
        return w2
    return np.pad(w2, ((0, pr), (0, pc)), mode="edge")


def to_blocks(w2p: np.ndarray, block_rows: int, block_cols: int) -> np.ndarray:
    """(R, C) with R, C multiples of the block -> (R/br * C/bc, br, bc), blocks in row-major order."""
    r, c = w2p.shape
    return (
        w2p.reshape(r // block_rows, block_rows, c // block_cols, block_cols)
        .transpose(0, 2, 1, 3)
        .reshape(-1, block_rows, block_cols)
    )


def from_blocks(blocks: np.ndarray, grid_rows: int, grid_cols: int) -> np.ndarray:
    """Inverse of :func:`to_blocks` for a grid of ``grid_rows`` x ``grid_cols`` blocks."""
    _, br, bc = blocks.shape
    return blocks.reshape(grid_rows, grid_cols, br, bc).transpose(0, 2, 1, 3).reshape(grid_rows * br, grid_cols * bc)


def check_float16_range(w: np.ndarray, codec_id: str) -> None:
    """Raise ``InvalidWeightError`` when ``w`` holds values a float16 scale cannot represent."""
    peak = float(np.abs(w).max()) if w.size else 0.0
    if peak > FLOAT16_MAX / 2:
        raise InvalidWeightError(
            f"{codec_id}: stores scales as float16, so |w| must stay below {FLOAT16_MAX / 2:g}; got {peak:g}"
        )


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 of shape (rows, 2n) -> uint8 (rows, n): low nibble even column, high odd."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: uint8 (rows, n) -> uint8 (rows, 2n)."""
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=out[:, 0::2])  # written in place: no temporaries
    np.right_shift(packed, 4, out=out[:, 1::2])
    return out


# 4-bit codes in a payload: the field ``nibbles`` (the native engine's nibble blocks, which it reads
# in place from a mapped file) where the padded width is a multiple of 32, else a codec's own field.

def four_bit_payload(q: np.ndarray, field: str, pack: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """4-bit codes ``q`` (rows, cols_p) as a payload entry: ``nibbles``, or ``field`` packed by ``pack``."""
    if q.shape[1] % 32 == 0:
        return {"nibbles": pack_nibble_blocks(q)}
    return {field: pack(q)}


def four_bit_field(payload, field: str, rows: int, cols_p: int, field_bytes: int) -> dict[str, tuple]:
    """The codes' entry of ``check_payload``'s expectations: ``nibbles`` when the payload holds
    them and the width allows, else ``field`` (``field_bytes`` a row: files written before)."""
    if "nibbles" in payload and cols_p % 32 == 0:
        return {"nibbles": ((rows, cols_p // 2), "uint8")}
    return {field: ((rows, field_bytes), "uint8")}


def four_bit_codes(payload, field: str, unpack: Callable[[np.ndarray], np.ndarray], start: int = 0,
                   stop: int | None = None) -> np.ndarray:
    """uint8 codes of rows ``start:stop`` from either entry."""
    if "nibbles" in payload:
        return unpack_nibble_blocks(payload["nibbles"][start:stop])
    return unpack(payload[field][start:stop])


def code_entry(payload, field: str) -> dict[str, np.ndarray]:
    """The payload's codes entry as stored: ``{"nibbles": ...}`` or ``{field: ...}``."""
    key = "nibbles" if "nibbles" in payload else field
    return {key: payload[key]}


def four_bit_lowered(payload, field: str, unpack: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """``Lowered``'s codes argument: the stored nibbles as they are, else the unpacked codes."""
    if "nibbles" in payload:
        return {"nibbles": payload["nibbles"]}
    return {"codes": unpack(payload[field])}


def absmax_group_scale(w2p: np.ndarray, group: int, peak: float) -> np.ndarray:
    """float16 scale per (row, group) so that ``|w| / scale <= peak``; zero groups get scale 0."""
    rows, cols = w2p.shape
    amax = np.abs(w2p.reshape(rows, cols // group, group)).max(axis=2)
    scale = (amax / peak).astype(np.float16)
    # float16 rounding may land below the exact value; nudge up so |w|/scale never exceeds ``peak``.
    low = scale.astype(np.float32) * peak < amax
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    return scale


def nearest_level(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index into sorted ``levels`` of the level nearest each value of ``x`` (ties go down)."""
    hi = np.clip(np.searchsorted(levels, x), 1, len(levels) - 1)
    lo = hi - 1
    return np.where(np.abs(x - levels[lo]) <= np.abs(levels[hi] - x), lo, hi)


def get_bits(words: np.ndarray, shift: int, width: int) -> np.ndarray:
    """Unsigned field ``[shift, shift+width)`` of integer ``words`` (as uint64)."""
    return (words.astype(np.uint64) >> np.uint64(shift)) & np.uint64((1 << width) - 1)


def put_bits(fields: Sequence[tuple[np.ndarray, int, int]]) -> np.ndarray:
    """OR together (values, shift, width) fields into uint64 words; values must fit their width."""
    word = None
    for values, shift, width in fields:
        v = np.asarray(values).astype(np.uint64)
        if np.any(v >> np.uint64(width)):
            raise ValueError(f"field at bit {shift} has values wider than {width} bits")
        part = v << np.uint64(shift)
        word = part if word is None else word | part
    return word


def fixed_point(x: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """Round ``x`` in [lo, hi] to an unsigned ``bits``-bit code (clipped)."""
    n = (1 << bits) - 1
    return np.clip(np.rint((np.asarray(x, dtype=np.float64) - lo) / (hi - lo) * n), 0, n).astype(np.uint64)


def from_fixed_point(code: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """Inverse of :func:`fixed_point` (float64)."""
    return lo + code.astype(np.float64) * ((hi - lo) / ((1 << bits) - 1))


def parallel_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> list[Any]:
    """``[fn(i) for i in items]`` on a thread pool of ``workers`` (0 = one per CPU); order kept."""
    items = list(items)
    n = workers or os.cpu_count() or 1
    if n <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, items))


def rows_from_block_rows(
    decode_block_rows: Callable[[int, int], np.ndarray], start: int, stop: int, block: int, cols: int
) -> np.ndarray:
    """Rows ``start:stop`` (float32, ``cols`` wide) from a decoder of whole block rows.

    ``decode_block_rows(br0, br1)`` returns block rows ``br0:br1`` at padded width.
    """
    if stop <= start:
        return np.zeros((0, cols), dtype=np.float32)
    br0, br1 = start // block, (stop - 1) // block + 1
    x = decode_block_rows(br0, br1)
    off = br0 * block
    return np.ascontiguousarray(x[start - off : stop - off, :cols], dtype=np.float32)


def require(cond: bool, codec_id: str, message: str) -> None:
    """Raise ``RBEFormatError`` with a codec-prefixed ``message`` unless ``cond``."""
    if not cond:
        raise RBEFormatError(f"{codec_id}: {message}")
