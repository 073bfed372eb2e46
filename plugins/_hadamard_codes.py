"""Packing of the ``hadamard`` codec's codes: ``bits``-bit little-endian streams, one per row
(payload field ``codes``), or, for 4-bit codes on widths that are multiples of 32, the native
engine's nibble blocks (field ``nibbles``), which the engine reads in place from a mapped file.

Shared by the codec (``hadamard.py``) and its training form (``torch_forms_hadamard.py``); numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ._blocks import code_entry, four_bit_codes, four_bit_field, four_bit_payload


def code_payload(q: np.ndarray, bits: int) -> dict[str, np.ndarray]:
    """The payload entry of uint8 codes ``q`` (rows, cols_p): ``nibbles`` (4-bit codes, widths that
    are multiples of 32) or ``codes``. Files written before ``nibbles`` hold ``codes`` at 4 bits
    too; both read alike."""
    if bits == 4:
        return four_bit_payload(q, "codes", lambda v: pack_codes(v, 4))
    return {"codes": pack_codes(q, bits)}


def code_field(payload: Mapping[str, np.ndarray], rows: int, cols_p: int, bits: int) -> dict[str, tuple]:
    """{field: (shape, dtype)} the codes of a valid payload take (``check_payload``'s form)."""
    stream = -(-cols_p * bits // 8)
    if bits == 4:
        return four_bit_field(payload, "codes", rows, cols_p, stream)
    return {"codes": ((rows, stream), "uint8")}


def stored_codes(payload: Mapping[str, np.ndarray]) -> np.ndarray:
    """The payload's packed codes array (either entry), e.g. as a cache key."""
    (array,) = code_entry(payload, "codes").values()
    return array


def payload_codes(payload: Mapping[str, np.ndarray], n: int, bits: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """uint8 codes (rows ``start:stop``, ``n`` wide) of a payload in either packing."""
    return four_bit_codes(payload, "codes", lambda v: unpack_codes(v, n, bits), start, stop)


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
