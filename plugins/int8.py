"""``int8``: symmetric 8-bit integers with one float32 scale per output channel (row).

Layout per tensor viewed as (rows, cols): ``q`` int8[rows, cols] with values in [-127, 127] and
``scale`` float32[rows]; ``w ≈ q * scale[:, None]``. About 8 + 32/cols bits per weight.
"""

from __future__ import annotations

import attrs
import numpy as np

from rbe_core import Codec, Encoded, hookimpl
from rbe_core.abc import check_payload
from rbe_core.arrays import as_weight, matrix_shape, row_chunks
from rbe_core.native.lowering import Lowered


@attrs.define(frozen=True)
class Int8Codec(Codec):
    codec_id = "int8"

    def encode(self, weight, *, calibration=None, source: str = "") -> Encoded:
        w, dtype = as_weight(weight)
        rows, cols = matrix_shape(w.shape)
        w2 = w.reshape(rows, cols)
        scale = np.empty(rows, np.float32)
        q = np.empty((rows, cols), np.int8)
        for start, stop in row_chunks(rows, cols):  # bounded temporaries, even for embeddings
            block = w2[start:stop]
            scale[start:stop] = np.abs(block).max(axis=1) / np.float32(127.0)
            safe = np.where(scale[start:stop] > 0, scale[start:stop], np.float32(1.0))
            q[start:stop] = np.clip(np.rint(block / safe[:, None]), -127, 127)
        return Encoded(self, w.shape, {"q": q, "scale": scale}, dtype=dtype, source=source)

    def torch_form(self):
        """Training form (``rbe_plugins.torch_forms``; imports torch on first use)."""
        from .torch_forms import FORMS

        return FORMS[self.codec_id]

    def validate(self, encoded: Encoded) -> None:
        rows, cols = matrix_shape(encoded.shape)
        check_payload(encoded, {"q": ((rows, cols), "int8"), "scale": ((rows,), "float32")})

    def decode_rows(self, encoded: Encoded, start: int, stop: int) -> np.ndarray:
        p = encoded.payload
        return p["q"][start:stop].astype(np.float32) * p["scale"][start:stop, None]

    def decode(self, encoded: Encoded) -> np.ndarray:
        return self.decode_rows(encoded, 0, encoded.matrix_shape[0]).reshape(encoded.shape)

    def lower(self, encoded: Encoded) -> Lowered:
        """8-bit codes ``q + 128`` over the levels -128..127, one group (the row) per step."""
        rows, cols = encoded.matrix_shape
        p = encoded.payload
        return Lowered(rows, cols, 8, cols, codes=(p["q"].view(np.uint8) ^ np.uint8(0x80)),
                       levels=_INT8_LEVELS, step=p["scale"].reshape(rows, 1))


_INT8_LEVELS = np.arange(-128, 128, dtype=np.float32)


@hookimpl
def rbe_register_codecs(register):
    register(Int8Codec)
