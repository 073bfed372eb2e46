"""A complete third-party codec plugin: ``example-nf``, a normal-float (QLoRA-style) low-bit code.

Layout for a tensor viewed as (rows, cols), with ``cols_p = cols`` rounded up to a multiple of
``group_size`` (the extra columns are zeros) and ``G = cols_p // group_size``:

- ``codes``  uint8[rows, cols_p * bits // 8]  one ``bits``-wide code per weight, each row a
             little-endian bit stream (code ``c`` is bits ``c*bits .. c*bits+bits-1``; bit ``j``
             of the stream is bit ``j % 8`` of byte ``j // 8``);
- ``scale``  float16[rows, G]  the group's max |w| rounded to float16.

The level table is fixed: the ``2**bits`` normal quantiles ``Φ⁻¹((i + 0.5) / 2**bits)``, made
exactly antisymmetric and divided by the largest, so they span [-1, 1] (float32). Decode:
``w[r, c] = levels[code[r, c]] * float32(scale[r, c // group_size])`` (one float32 multiply),
padding columns dropped. Bits per weight: ``bits + 16 / group_size`` (3.25 at the default 3 bits,
group 64) plus the tensor's header entry in the .rbe file.

The codec implements ``lower`` (its layout *is* the canonical "codes through a table times a step
per group") and ``from_lowered`` (the inverse), so with no further code every backend runs it on
native kernels, ``rbe finetune`` trains its steps and conversion can use calibrated (GPTQ) rounding.
"""

from __future__ import annotations

import functools
from statistics import NormalDist

import attrs
import numpy as np

from rbe_core import Codec, Encoded, hookimpl
from rbe_core.abc import check_payload
from rbe_core.arrays import as_weight, matrix_shape
from rbe_core.native import Lowered, nearest_codes

_F16_MAX = 65504.0


@functools.cache
def nf_levels(bits: int) -> np.ndarray:
    """The fixed float32 level table for ``bits`` (ascending, exactly antisymmetric, ends ±1).
    Callers must not modify it (it is cached and shared)."""
    n = 2**bits
    q = np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)], dtype=np.float64)
    q = (q - q[::-1]) / 2
    levels = (q / np.abs(q).max()).astype(np.float32)
    levels.flags.writeable = False
    return levels


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 (rows, n) codes < 2**bits -> uint8 (rows, n * bits // 8) little-endian bit streams
    (``n * bits`` must be a multiple of 8)."""
    rows, n = codes.shape
    fields = np.unpackbits(codes[:, :, None], axis=2, bitorder="little")[:, :, :bits]
    return np.packbits(fields.reshape(rows, n * bits), axis=1, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_codes`: uint8 (rows, n) codes."""
    rows, nbytes = packed.shape
    fields = np.unpackbits(packed, axis=1, bitorder="little").reshape(rows, nbytes * 8 // bits, bits)
    return np.packbits(fields, axis=2, bitorder="little")[:, :, 0]


def _bits(_inst, attribute, value) -> None:
    if isinstance(value, bool) or value not in (2, 3, 4):
        raise ValueError(f"{attribute.name} must be 2, 3 or 4, got {value!r}")


def _group_size(_inst, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value % 32 or not 32 <= value <= 1024:
        raise ValueError(f"{attribute.name} must be a multiple of 32 in [32, 1024], got {value!r}")


@attrs.define(frozen=True)
class ExampleNFCodec(Codec):
    """Normal-float codes, ``bits`` per weight, one float16 absmax scale per ``group_size`` columns."""

    codec_id = "example-nf"
    #: the level table is fixed; training changes only the per-group steps
    trainable_lowered = ("step",)

    bits: int = attrs.field(default=3, validator=_bits)
    group_size: int = attrs.field(default=64, validator=_group_size)

    @property
    def levels(self) -> np.ndarray:
        return nf_levels(self.bits)

    def _dims(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(rows, cols, cols_p, groups) of a tensor of ``shape``."""
        rows, cols = matrix_shape(shape)
        cols_p = -(-cols // self.group_size) * self.group_size
        return rows, cols, cols_p, cols_p // self.group_size

    def encode(self, weight, *, calibration=None, source: str = "") -> Encoded:
        """Round each weight to the nearest level times its group's float16 absmax."""
        w, dtype = as_weight(weight)
        rows, cols, cols_p, groups = self._dims(w.shape)
        wp = np.zeros((rows, cols_p), dtype=np.float32)
        wp[:, :cols] = w.reshape(rows, cols)
        g = wp.reshape(rows, groups, self.group_size)
        scale = np.minimum(np.abs(g).max(axis=2), np.float32(_F16_MAX)).astype(np.float16)
        step = scale.astype(np.float32)
        step[step == 0] = 1.0  # an all-zero (or float16-underflowing) group: codes nearest 0
        codes = nearest_codes(self.levels, (g / step[:, :, None]).reshape(rows, cols_p))
        payload = {"codes": pack_codes(codes, self.bits), "scale": scale}
        return Encoded(self, w.shape, payload, dtype=dtype, source=source)

    def validate(self, encoded: Encoded) -> None:
        """``RBEFormatError`` unless codes and scale have this config's shapes and dtypes."""
        rows, _, cols_p, groups = self._dims(encoded.shape)
        check_payload(encoded, {"codes": ((rows, cols_p * self.bits // 8), "uint8"),
                                "scale": ((rows, groups), "float16")})

    def decode_rows(self, encoded: Encoded, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the (rows, cols) view, float32, bit-identical to ``lower``."""
        _, cols, cols_p, _ = self._dims(encoded.shape)
        p = encoded.payload
        codes = unpack_codes(p["codes"][start:stop], self.bits)
        step = p["scale"][start:stop].astype(np.float32)
        w = self.levels[codes] * step[:, np.arange(cols_p) // self.group_size]
        return np.ascontiguousarray(w[:, :cols])

    def decode(self, encoded: Encoded) -> np.ndarray:
        return self.decode_rows(encoded, 0, encoded.matrix_shape[0]).reshape(encoded.shape)

    def lower(self, encoded: Encoded) -> Lowered:
        """The canonical layout: one code a byte, the fixed levels, ``scale`` as the float32 step."""
        rows, cols, _, _ = self._dims(encoded.shape)
        p = encoded.payload
        return Lowered(rows=rows, cols=cols, bits=self.bits, group_size=self.group_size,
                       codes=unpack_codes(p["codes"], self.bits), levels=self.levels.copy(),
                       step=p["scale"].astype(np.float32))

    def from_lowered(self, encoded: Encoded, lowered: Lowered) -> Encoded:
        """``lowered``'s codes and steps (clipped to ±65504, rounded to float16) stored like
        ``encoded``. ``ValueError`` for another shape, bit width or group size, a changed level
        table, an offset, transform or dense layout, codes out of range or non-finite steps."""
        rows, cols, cols_p, groups = self._dims(encoded.shape)
        got = (lowered.rows, lowered.cols, lowered.bits, lowered.group_size, lowered.cols_p)
        if got != (rows, cols, self.bits, self.group_size, cols_p):
            raise ValueError(f"{self.codec_id}: lowered (rows, cols, bits, group_size, cols_p) {got} "
                             f"!= {(rows, cols, self.bits, self.group_size, cols_p)}")
        if not np.array_equal(lowered.levels, self.levels):
            raise ValueError(f"{self.codec_id}: the level table is fixed and cannot change")
        if lowered.offset is not None or lowered.transform is not None or lowered.dense is not None:
            raise ValueError(f"{self.codec_id}: stores no offset, transform or dense values")
        if lowered.codes.max(initial=0) >= 2**self.bits:
            raise ValueError(f"{self.codec_id}: codes must be below {2**self.bits}")
        if lowered.step.shape != (rows, groups) or not np.isfinite(lowered.step).all():
            raise ValueError(f"{self.codec_id}: steps must be finite float32 ({rows}, {groups})")
        scale = np.clip(lowered.step, -_F16_MAX, _F16_MAX).astype(np.float16)
        payload = {"codes": pack_codes(lowered.codes, self.bits), "scale": scale}
        return Encoded(self, encoded.shape, payload, dtype=encoded.dtype, source=encoded.source)

    def bit_settings(self) -> list[Codec]:
        """4, 3 and 2 bits at this group size, best quality first."""
        return [attrs.evolve(self, bits=b) for b in (4, 3, 2)]


@hookimpl
def rbe_register_codecs(register):
    register(ExampleNFCodec)
