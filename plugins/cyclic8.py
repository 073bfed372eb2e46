"""``cyclic8``: seed 002's ``CyclicCode8`` — one byte per weight, decoded from a table indexed by
function family x derivative order x phase, times a float16 scale per group of columns.

Byte layout (bit 7 is the most significant)::

    7   6   5   4   3   2   1   0
    +-------+-------+---------------+
    | family| deriv |     phase     |
    +-------+-------+---------------+

- ``phase`` p (4 bits), ``deriv`` d (2 bits, the derivative order), ``family`` f (2 bits):
  0 = sin on θ = 2πp/16, derivative cycle Z/4 (sin, cos, −sin, −cos);
  1 = Lorentz sinh on r = 2p/15, cycle Z/2 (sinh, cosh, sinh, cosh: orders 2, 3 repeat 0, 1);
  2 = Poincaré tanh(r/2), 3 = Klein 2r/(1+r²), both on r = 4(p − 7.5)/7.5 with the closed-form
  derivative of order d (no finite cycle exists).
- table ``T[f][d][p] = round(127 · g(x_p) / max_p |g|)`` (int8), built once from the geometry
  plugins; ``w = float32(T[code] / 127) · float32(scale[row, group])``.

Many codes share a value (the cycles repeat themselves), so the byte buys far fewer than 256
distinct levels; the docs page states the count and the measured error.
"""

from __future__ import annotations

import functools

import attrs
import numpy as np

from rbe_core import hookimpl

from ._lut import LutGroupCodec
from .klein import Klein
from .lorentz import Lorentz
from .poincare import Poincare


@functools.lru_cache(maxsize=1)
def cyclic8_table() -> np.ndarray:
    """int8[4 families, 4 derivative orders, 16 phases]."""
    p = np.arange(16, dtype=np.float64)
    theta = 2 * np.pi * p / 16
    r_pos = 2.0 * p / 15
    r_sym = 4.0 * (p - 7.5) / 7.5
    rows = []
    for d in range(4):
        rows.append(
            [
                Poincare.angular(theta, d),
                Lorentz().radial(r_pos, d),
                Poincare().radial(r_sym, d),
                Klein().radial(r_sym, d),
            ]
        )
    g = np.array(rows).transpose(1, 0, 2)  # (family, d, p)
    peak = np.abs(g).max(axis=2, keepdims=True)
    table = np.rint(127.0 * g / np.where(peak > 0, peak, 1.0)).astype(np.int8)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=1)
def _lut8() -> np.ndarray:
    t = cyclic8_table()
    code = np.arange(256)
    lut = (t[code >> 6, (code >> 4) & 3, code & 15].astype(np.float64) / 127.0).astype(np.float32)
    lut.setflags(write=False)
    return lut


@attrs.define(frozen=True)
class Cyclic8Codec(LutGroupCodec):
    codec_id = "cyclic8"
    code_dtype = "uint8"

    def lut(self) -> np.ndarray:
        return _lut8()


@hookimpl
def rbe_register_codecs(register):
    register(Cyclic8Codec)
