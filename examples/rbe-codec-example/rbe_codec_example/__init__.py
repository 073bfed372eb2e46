"""A complete third-party codec plugin: ``example-fp16``.

Stores each weight as float16 after dividing by one float32 scale per tensor (max |w| / 2**14),
so large-magnitude tensors do not overflow float16 and small ones keep their precision.
About 16 bits per weight; relative error ≈ 2**-11.
"""

from __future__ import annotations

import attrs
import numpy as np

from rbe_core import Codec, Encoded, hookimpl
from rbe_core.abc import check_payload
from rbe_core.arrays import as_weight, matrix_shape

_HEADROOM = np.float32(2.0**14)


@attrs.define(frozen=True)
class ExampleFp16Codec(Codec):
    codec_id = "example-fp16"

    def encode(self, weight, *, calibration=None, source: str = "") -> Encoded:
        w, dtype = as_weight(weight)
        peak = np.float32(np.abs(w).max())
        scale = np.array([peak / _HEADROOM if peak > 0 else 1.0], dtype=np.float32)
        values = (w.reshape(matrix_shape(w.shape)) / scale[0]).astype(np.float16)
        return Encoded(self, w.shape, {"values": values, "scale": scale}, dtype=dtype, source=source)

    def validate(self, encoded: Encoded) -> None:
        check_payload(encoded, {"values": (matrix_shape(encoded.shape), "float16"), "scale": ((1,), "float32")})

    def decode_rows(self, encoded: Encoded, start: int, stop: int) -> np.ndarray:
        p = encoded.payload
        return p["values"][start:stop].astype(np.float32) * p["scale"][0]

    def decode(self, encoded: Encoded) -> np.ndarray:
        return self.decode_rows(encoded, 0, encoded.matrix_shape[0]).reshape(encoded.shape)


@hookimpl
def rbe_register_codecs(register):
    register(ExampleFp16Codec)
