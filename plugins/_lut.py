"""Shared machinery of table-driven per-weight codes (``cyclic8``, ``cyclic16``).

A tensor viewed as (rows, cols) is zero-padded to a multiple of ``group_size`` columns; each
(row, group) has a float16 scale and each weight one code. The codec supplies ``lut()``: the
float32 value of every code, built from small integer tables, so that

    w[r, c] = float32(lut[code[r, c]]) * float32(scale[r, c // group_size])

Encoding picks, per weight, the code whose value is nearest to ``w / scale`` (absmax scaling so
the largest |w| of a group maps to the largest |lut| value).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import attrs
import numpy as np

from rbe_core import Codec, Encoded
from rbe_core.abc import check_payload
from rbe_core.arrays import as_weight, matrix_shape

from ._blocks import absmax_group_scale, check_float16_range, nearest_level, pad_cols, round_up


def _positive_int(_inst, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@attrs.define(frozen=True)
class LutGroupCodec(Codec):
    """Base class: subclasses set ``codec_id``, ``code_dtype`` and implement ``lut()``."""

    code_dtype: ClassVar[str]
    group_size: int = attrs.field(default=64, validator=_positive_int)

    @abc.abstractmethod
    def lut(self) -> np.ndarray:
        """float32 value of every code, indexed by code (length 2**bits)."""

    def _levels(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct values and, for each, the smallest code producing it."""
        values, first = np.unique(self.lut(), return_index=True)
        return values, first.astype(self.code_dtype)

    def encode(self, weight, *, calibration=None, source: str = "") -> Encoded:
        w, dtype = as_weight(weight)
        check_float16_range(w, self.codec_id)
        rows, cols = matrix_shape(w.shape)
        w2p = pad_cols(w.reshape(rows, cols), self.group_size)
        lut = self.lut()
        peak = float(np.abs(lut).max())
        scale = absmax_group_scale(w2p, self.group_size, peak)
        sc = scale.astype(np.float32)
        safe = np.where(sc > 0, sc, np.float32(1.0))
        target = (w2p.reshape(rows, -1, self.group_size) / safe[..., None]).reshape(rows, -1)
        levels, codes = self._levels()
        code = codes[nearest_level(target, levels)]
        return Encoded(self, w.shape, {"code": code, "scale": scale}, dtype=dtype, source=source)

    def torch_form(self):
        """Training form (``rbe_plugins.torch_forms``; imports torch on first use)."""
        from .torch_forms import FORMS

        return FORMS[self.codec_id]

    def validate(self, encoded: Encoded) -> None:
        rows, cols = matrix_shape(encoded.shape)
        cols_p = round_up(cols, self.group_size)
        check_payload(
            encoded,
            {"code": ((rows, cols_p), self.code_dtype), "scale": ((rows, cols_p // self.group_size), "float16")},
        )

    def decode_rows(self, encoded: Encoded, start: int, stop: int) -> np.ndarray:
        p = encoded.payload
        _, cols = encoded.matrix_shape
        v = self.lut()[p["code"][start:stop]]
        n, cols_p = v.shape
        v = v.reshape(n, cols_p // self.group_size, self.group_size) * p["scale"][start:stop, :, None].astype(np.float32)
        return np.ascontiguousarray(v.reshape(n, cols_p)[:, :cols])

    def decode(self, encoded: Encoded) -> np.ndarray:
        return self.decode_rows(encoded, 0, encoded.matrix_shape[0]).reshape(encoded.shape)
