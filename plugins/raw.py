"""``raw``: the tensor stored as it is (float32, or float16 when the source was 16-bit).

Used for tensors a model keeps uncompressed (norms, biases) so a .rbe file is self-contained.
"""

from __future__ import annotations

import attrs
import numpy as np

from rbe_core import Codec, Encoded, hookimpl
from rbe_core.abc import check_payload
from rbe_core.arrays import as_weight, matrix_shape
from rbe_core.errors import RBEFormatError
from rbe_core.native.lowering import Lowered


@attrs.define(frozen=True)
class RawCodec(Codec):
    codec_id = "raw"
    storage: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "float32", "float16")))

    def _storage_for(self, source_dtype: str) -> str:
        if self.storage != "auto":
            return self.storage
        return "float16" if source_dtype == "float16" else "float32"

    def encode(self, weight, *, calibration=None, source: str = "") -> Encoded:
        w, dtype = as_weight(weight, min_ndim=0)
        data = w.reshape(-1).astype(self._storage_for(dtype))
        return Encoded(self, w.shape, {"data": data}, dtype=dtype, source=source)

    def validate(self, encoded: Encoded) -> None:
        dt = encoded.payload.get("data", np.empty(0)).dtype
        if dt not in (np.float16, np.float32):
            raise RBEFormatError(f"raw: unsupported storage dtype {dt}")
        check_payload(encoded, {"data": ((encoded.numel,), dt)})

    def decode(self, encoded: Encoded) -> np.ndarray:
        return encoded.payload["data"].astype(np.float32).reshape(encoded.shape)

    def lower(self, encoded: Encoded) -> Lowered | None:
        """Matrices lower to the dense float32 layout (vectors have no matrix form)."""
        if len(encoded.shape) < 2:
            return None
        rows, cols = matrix_shape(encoded.shape)
        return Lowered(rows, cols, 32, dense=self.decode(encoded).reshape(rows, cols))


@hookimpl
def rbe_register_codecs(register):
    register(RawCodec)
