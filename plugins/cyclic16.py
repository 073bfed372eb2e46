"""``cyclic16``: seed 002's ``CyclicCode16`` (micro phase, phase cycle, derivative order) with the
6-bit amplitude of its ``CompoundCyclicCode`` — one uint16 per weight, table-driven decode.

Word layout (bit 15 is the most significant)::

    15         10 9   8 7       4 3       0
    +------------+-----+---------+---------+
    | amplitude  |deriv|  phase  |  micro  |
    +------------+-----+---------+---------+

- phase index k = 16·phase + micro (8 bits, θ = 2πk/256); derivative order d (Z/4 cycle of sin);
  amplitude a (0..63).
- table ``T[d][k] = round(32767 · sin^(d)(θ_k))`` (int16, 4 x 256 = 2 KiB);
  ``w = float32(a · T[d][k] / (63 · 32767)) · float32(scale[row, group])``.

The derivative order only rotates the phase by a quarter turn, so it adds no distinct values;
the docs page reports the distinct-level count and the measured error.
"""

from __future__ import annotations

import functools

import attrs
import numpy as np

from rbe_core import Geometry, hookimpl

from ._lut import LutGroupCodec


@functools.lru_cache(maxsize=1)
def cyclic16_table() -> np.ndarray:
    """int16[4 derivative orders, 256 phases]."""
    theta = 2 * np.pi * np.arange(256) / 256
    table = np.stack([np.rint(32767.0 * Geometry.angular(theta, d)) for d in range(4)]).astype(np.int16)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=1)
def _lut16() -> np.ndarray:
    code = np.arange(1 << 16)
    amp = (code >> 10).astype(np.int64)
    val = amp * cyclic16_table()[(code >> 8) & 3, code & 255].astype(np.int64)
    lut = (val.astype(np.float64) / (63.0 * 32767.0)).astype(np.float32)
    lut.setflags(write=False)
    return lut


@attrs.define(frozen=True)
class Cyclic16Codec(LutGroupCodec):
    codec_id = "cyclic16"
    code_dtype = "uint16"

    def lut(self) -> np.ndarray:
        return _lut16()


@hookimpl
def rbe_register_codecs(register):
    register(Cyclic16Codec)
