"""``packed64``: seed 004's ``Packed64`` — one 64-bit code per B x B block, no DC level.

The atom (see ``_packed``): ``w(i,j) = r·S[d_y](ω_y·i + ψ)·S[d_x](ω_x·j + θ)``. Stored as
uint64[nblocks, 1], blocks in row-major order::

    63           48 47      36 35      24 23      14 13       4  3  2  1  0
    +--------------+----------+----------+----------+----------+-----+-----+
    | r (float16)  | ψ (12 b) | θ (12 b) | ω_y(10b) | ω_x(10b) | d_y | d_x |
    +--------------+----------+----------+----------+----------+-----+-----+

- θ, ψ = code·(π/2)/4095; ω = code·π/1023; d_x, d_y are the derivative-cycle positions (Z/4).
"""

from __future__ import annotations

import attrs
import numpy as np

from rbe_core import hookimpl

from ._blocks import FLOAT16_MAX, fixed_point, from_fixed_point, get_bits, put_bits, require
from ._packed import HALF_PI, PackedCodec, block_size_validator


@attrs.define(frozen=True)
class Packed64Codec(PackedCodec):
    codec_id = "packed64"
    words = 1
    with_dc = False
    block: int = attrs.field(default=8, validator=block_size_validator)

    def pack(self, p: dict[str, np.ndarray]) -> np.ndarray:
        r = np.clip(p["r"], 0, FLOAT16_MAX).astype(np.float16)
        word = put_bits(
            [
                (p["d_x"], 0, 2),
                (p["d_y"], 2, 2),
                (fixed_point(p["omega_x"], 0, np.pi, 10), 4, 10),
                (fixed_point(p["omega_y"], 0, np.pi, 10), 14, 10),
                (fixed_point(p["theta"], 0, HALF_PI, 12), 24, 12),
                (fixed_point(p["psi"], 0, HALF_PI, 12), 36, 12),
                (r.view(np.uint16), 48, 16),
            ]
        )
        return word[:, None]

    def unpack(self, code: np.ndarray) -> dict[str, np.ndarray]:
        w = code[:, 0]
        r = get_bits(w, 48, 16).astype(np.uint16).view(np.float16).astype(np.float64)
        return {
            "r": r,
            "d_x": get_bits(w, 0, 2).astype(np.int64),
            "d_y": get_bits(w, 2, 2).astype(np.int64),
            "omega_x": from_fixed_point(get_bits(w, 4, 10), 0, np.pi, 10),
            "omega_y": from_fixed_point(get_bits(w, 14, 10), 0, np.pi, 10),
            "theta": from_fixed_point(get_bits(w, 24, 12), 0, HALF_PI, 12),
            "psi": from_fixed_point(get_bits(w, 36, 12), 0, HALF_PI, 12),
            "dc": np.zeros(len(w)),
        }

    def check_codes(self, code: np.ndarray) -> None:
        r = self.unpack(code)["r"]
        require(bool((np.isfinite(r) & (r >= 0)).all()), self.codec_id, "r must be finite and >= 0")


@hookimpl
def rbe_register_codecs(register):
    register(Packed64Codec)
