"""``int4``: group-wise affine 4-bit round-to-nearest along the input dimension (a baseline).

Layout for a tensor viewed as (rows, cols), with ``cols_p = cols`` rounded up to a multiple of
``group_size`` (the extra columns are zeros) and ``G = cols_p // group_size``:

- ``q``        uint8[rows, cols_p // 2]  two 4-bit codes per byte: low nibble = even column,
                                          high nibble = odd column; or, where ``cols_p`` is a
                                          multiple of 32 (written so since 2026-12-06; older
                                          files hold ``q`` and read alike),
  ``nibbles``  uint8[rows, cols_p // 2]  the native engine's nibble blocks (per 32 columns 16
                                          bytes, byte t = code t | code t + 16 << 4), which it
                                          reads in place from a mapped file;
- ``scale``    float16[rows, G];
- ``minimum``  float16[rows, G].

Decode: ``w[r, c] = float32(q[r, c]) * float32(scale[r, g]) + float32(minimum[r, g])`` with
``g = c // group_size``, evaluated as a float32 multiply followed by a float32 add (no FMA), then
the padding columns are dropped. About ``4 + 32 / group_size`` bits per weight (4.5 at g = 64).
"""

from __future__ import annotations

import attrs
import numpy as np

from rbe_core import Codec, Encoded, hookimpl
from rbe_core.abc import check_payload
from rbe_core.arrays import as_weight, matrix_shape
from rbe_core.native.lowering import Lowered

from ._blocks import (
    check_float16_range,
    four_bit_codes,
    four_bit_field,
    four_bit_lowered,
    four_bit_payload,
    pack_nibbles,
    pad_cols,
    round_up,
    unpack_nibbles,
)


def _even_positive(_inst, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
        raise ValueError(f"{attribute.name} must be an even integer >= 2, got {value!r}")


@attrs.define(frozen=True)
class Int4Codec(Codec):
    codec_id = "int4"
    group_size: int = attrs.field(default=64, validator=_even_positive)

    def _padded_cols(self, cols: int) -> int:
        return round_up(cols, self.group_size)

    def encode(self, weight, *, calibration=None, source: str = "") -> Encoded:
        w, dtype = as_weight(weight)
        check_float16_range(w, self.codec_id)
        rows, cols = matrix_shape(w.shape)
        w2p = pad_cols(w.reshape(rows, cols), self.group_size)
        g = w2p.reshape(rows, -1, self.group_size)
        gmin, gmax = g.min(axis=2), g.max(axis=2)
        minimum = gmin.astype(np.float16)
        up = minimum.astype(np.float32) > gmin  # float16 rounding must not lift the minimum
        minimum[up] = np.nextafter(minimum[up], np.float16(-np.inf))
        lo = minimum.astype(np.float32)
        scale = ((gmax - lo) / 15.0).astype(np.float16)
        short = scale.astype(np.float32) * 15.0 + lo < gmax  # nor shrink the range
        scale[short] = np.nextafter(scale[short], np.float16(np.inf))
        sc = scale.astype(np.float32)
        safe = np.where(sc > 0, sc, np.float32(1.0))
        q = np.clip(np.rint((g - lo[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
        codes = four_bit_payload(q.reshape(rows, -1), "q", pack_nibbles)
        return Encoded(self, w.shape, {**codes, "scale": scale, "minimum": minimum}, dtype=dtype, source=source)

    def torch_form(self):
        """Training form (``rbe_plugins.torch_forms``; imports torch on first use)."""
        from .torch_forms import FORMS

        return FORMS[self.codec_id]

    def validate(self, encoded: Encoded) -> None:
        rows, cols = matrix_shape(encoded.shape)
        cols_p = self._padded_cols(cols)
        groups = cols_p // self.group_size
        check_payload(
            encoded,
            {
                **four_bit_field(encoded.payload, "q", rows, cols_p, cols_p // 2),
                "scale": ((rows, groups), "float16"),
                "minimum": ((rows, groups), "float16"),
            },
        )

    def decode_rows(self, encoded: Encoded, start: int, stop: int) -> np.ndarray:
        p = encoded.payload
        _, cols = encoded.matrix_shape
        q = four_bit_codes(p, "q", unpack_nibbles, start, stop)
        n = q.shape[0]
        g = q.reshape(n, q.shape[1] // self.group_size, self.group_size).astype(np.float32)
        w = g * p["scale"][start:stop, :, None].astype(np.float32)
        w += p["minimum"][start:stop, :, None].astype(np.float32)
        return np.ascontiguousarray(w.reshape(n, q.shape[1])[:, :cols])

    def decode(self, encoded: Encoded) -> np.ndarray:
        return self.decode_rows(encoded, 0, encoded.matrix_shape[0]).reshape(encoded.shape)

    def lower(self, encoded: Encoded) -> Lowered:
        """4-bit codes over the levels 0..15, step ``scale`` and offset ``minimum`` per group."""
        rows, cols = encoded.matrix_shape
        p = encoded.payload
        return Lowered(rows, cols, 4, self.group_size, **four_bit_lowered(p, "q", unpack_nibbles),
                       levels=np.arange(16, dtype=np.float32), step=p["scale"].astype(np.float32),
                       offset=p["minimum"].astype(np.float32))


@hookimpl
def rbe_register_codecs(register):
    register(Int4Codec)
