"""``packed128``: seed 000's ``Packed128`` — one 128-bit code (hi, lo) per B x B block.

The atom (see ``_packed``): ``w(i,j) = r·(S[d_y](ω_y·i + ψ)·S[d_x](ω_x·j + θ) + δ)``.
Stored as uint64[nblocks, 2] = (hi, lo), blocks in row-major order::

    lo:  63                              32 31                               0
         +---------------------------------+----------------------------------+
         |          θ  (float32)           |           r  (float32)           |
         +---------------------------------+----------------------------------+

    hi:  63        47 46        29 28        11 10      4  3  2  1  0
         +----------+------------+------------+---------+-----+-----+
         | ψ (17 b) | ω_y (18 b) | ω_x (18 b) | DC (7b) | d_y | d_x |
         +----------+------------+------------+---------+-----+-----+
                                               \\______ 11-bit state ______/

- the 11-bit state (hi & 0x7FF) holds the two derivative-cycle positions d_x, d_y (Z/4 each) and
  the DC code; θ ∈ [0, π/2] float32; ψ = code·(π/2)/(2^17−1); ω = code·π/(2^18−1);
- DC code c (7 bits): δ = (c − 64) / 32, so δ ∈ [−2, 1.97] in steps of 1/32 (δ = 0 at c = 64).
"""

from __future__ import annotations

import attrs
import numpy as np

from rbe_core import hookimpl

from ._blocks import fixed_point, from_fixed_point, get_bits, put_bits, require
from ._packed import HALF_PI, PackedCodec, block_size_validator


def _dc_code(delta: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(delta) * 32 + 64), 0, 127).astype(np.uint64)


def _dc_value(code: np.ndarray) -> np.ndarray:
    return (code.astype(np.float64) - 64) / 32


@attrs.define(frozen=True)
class Packed128Codec(PackedCodec):
    codec_id = "packed128"
    words = 2
    with_dc = True
    dc_range = 2.0
    block: int = attrs.field(default=16, validator=block_size_validator)

    def pack(self, p: dict[str, np.ndarray]) -> np.ndarray:
        r, m = p["r"].astype(np.float32), p["dc"]
        delta = np.divide(m, r.astype(np.float64), out=np.zeros_like(m), where=r > 0)
        hi = put_bits(
            [
                (p["d_x"], 0, 2),
                (p["d_y"], 2, 2),
                (_dc_code(delta), 4, 7),
                (fixed_point(p["omega_x"], 0, np.pi, 18), 11, 18),
                (fixed_point(p["omega_y"], 0, np.pi, 18), 29, 18),
                (fixed_point(p["psi"], 0, HALF_PI, 17), 47, 17),
            ]
        )
        theta = p["theta"].astype(np.float32)
        lo = r.view(np.uint32).astype(np.uint64) | (theta.view(np.uint32).astype(np.uint64) << np.uint64(32))
        return np.stack([hi, lo], axis=1)

    def unpack(self, code: np.ndarray) -> dict[str, np.ndarray]:
        hi, lo = code[:, 0], code[:, 1]
        r = (lo & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32).astype(np.float64)
        theta = (lo >> np.uint64(32)).astype(np.uint32).view(np.float32).astype(np.float64)
        return {
            "r": r,
            "theta": theta,
            "d_x": get_bits(hi, 0, 2).astype(np.int64),
            "d_y": get_bits(hi, 2, 2).astype(np.int64),
            "dc": r * _dc_value(get_bits(hi, 4, 7)),
            "omega_x": from_fixed_point(get_bits(hi, 11, 18), 0, np.pi, 18),
            "omega_y": from_fixed_point(get_bits(hi, 29, 18), 0, np.pi, 18),
            "psi": from_fixed_point(get_bits(hi, 47, 17), 0, HALF_PI, 17),
        }

    def check_codes(self, code: np.ndarray) -> None:
        p = self.unpack(code)
        ok = np.isfinite(p["r"]) & (p["r"] >= 0) & np.isfinite(p["theta"]) & (np.abs(p["theta"]) <= 4 * np.pi)
        require(bool(ok.all()), self.codec_id, "r must be finite and >= 0, θ finite and within ±4π")


@hookimpl
def rbe_register_codecs(register):
    register(Packed128Codec)
