"""``QuantizedLinear``: a drop-in replacement for ``nn.Linear`` (and HF GPT-2's ``Conv1D``) in any torch model.

The weight stays encoded and runs through the backend's fused kernels (``rbe_core.layers.RBELinear``).
For ``state_dict``/safetensors the payload arrays are buffers named ``rbe_<field>`` (their own
dtypes and shapes), plus ``weight``: an empty ``uint8`` marker, so a checkpoint loaded without rbe
fails with a size mismatch instead of leaving random weights. Reading ``layer.weight`` decodes the
weight in the replaced module's own layout; ``dequantize()`` returns the replaced module type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..abc import Backend, Encoded
from ..errors import RBEFormatError
from ..layers import RBELinear
from ..registry import get_codec

#: Prefix of the payload buffers in ``state_dict``.
FIELD_PREFIX = "rbe_"


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


class QuantizedLinear(RBELinear):
    """``y = x @ Wᵀ + b`` with ``W`` encoded; ``conv1d=True`` when it replaced a ``Conv1D`` (weight (in, out)).

    The encoded matrix is always (out_features, in_features). Inputs of any float dtype are computed
    in float32 and returned in the input's dtype.
    """

    def __init__(self, encoded: Encoded, bias: torch.Tensor | None = None, backend: Backend | None = None,
                 *, conv1d: bool = False):
        super().__init__(encoded, bias, backend)
        self.conv1d = conv1d
        self._buffers["weight"] = torch.empty(0, dtype=torch.uint8)  # the marker (see the module docstring)
        for field, array in encoded.payload.items():
            self.register_buffer(FIELD_PREFIX + field, _as_tensor(array))
        self._loaded = True

    @classmethod
    def shell(cls, entry: Mapping[str, Any], bias: bool, backend: Backend | None = None) -> QuantizedLinear:
        """An empty layer for ``entry`` (``module_entry``'s JSON), its buffers filled later by a
        state-dict load; ``refresh()`` then checks and adopts them."""
        codec = get_codec(entry["codec"])
        fields = entry["fields"]
        payload = {f: np.zeros(shape, dtype=np.dtype(dt)) for f, (shape, dt) in fields.items()}
        enc = Encoded(codec, tuple(entry["shape"]), payload, source=entry.get("source", ""))
        out = cls(enc, torch.zeros(entry["shape"][0]) if bias else None, backend, conv1d=bool(entry.get("conv1d")))
        out._loaded = False
        out._entry = dict(entry)
        return out

    def refresh(self) -> None:
        """Rebuild the encoded weight from the payload buffers (after a state-dict load) and check
        it: every field present, on the CPU, the codec's own validation, and the recorded checksum."""
        entry = getattr(self, "_entry", None)
        payload = {}
        for name, buf in self._buffers.items():
            if not name.startswith(FIELD_PREFIX):
                continue
            if buf is None or buf.is_meta:
                raise RBEFormatError(f"{self.encoded.source or 'a layer'}: payload field {name!r} was not in the checkpoint")
            payload[name[len(FIELD_PREFIX):]] = buf.detach().cpu().numpy()
        enc = Encoded(self.encoded.codec, self.encoded.shape, payload, dtype=self.encoded.dtype, source=self.encoded.source)
        enc.codec.validate(enc)
        if entry is not None and entry.get("sha256") and entry["sha256"] != enc.checksum:
            raise RBEFormatError(f"{enc.source}: the loaded codes do not match the checksum recorded at save time")
        self.encoded = enc
        self._loaded = True

    def set_encoded(self, encoded: Encoded) -> None:
        """Replace the weight (same shape), e.g. after a LoRA merge re-encoded it."""
        if encoded.shape != self.encoded.shape:
            raise ValueError(f"shape {list(encoded.shape)} does not match {list(self.encoded.shape)}")
        for name in [n for n in self._buffers if n.startswith(FIELD_PREFIX)]:
            del self._buffers[name]
        for field, array in encoded.payload.items():
            self.register_buffer(FIELD_PREFIX + field, _as_tensor(array))
        self.encoded = encoded

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight, float32, in the replaced module's layout ((out, in); (in, out) for
        Conv1D). A fresh tensor: writing to it does not change the codes. Before a load completes,
        the marker tensor."""
        if not self._loaded:
            return self._buffers["weight"]
        w = self.dense_weight()
        return w.T.contiguous() if self.conv1d else w

    def dequantize(self) -> nn.Module:
        """An ``nn.Linear`` (or ``Conv1D``) with the decoded weight, bit for bit ``encoded.decode()``."""
        dense = self.dense_weight()
        has_bias = self.bias is not None
        if self.conv1d:
            from transformers.pytorch_utils import Conv1D

            out = Conv1D(self.out_features, self.in_features)
            with torch.no_grad():
                out.weight.copy_(dense.T)
                if has_bias:
                    out.bias.copy_(self.bias)
                else:
                    out.bias = None
            return out
        out = nn.Linear(self.in_features, self.out_features, bias=has_bias)
        with torch.no_grad():
            out.weight.copy_(dense)
            if has_bias:
                out.bias.copy_(self.bias)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return super().forward(x.float()).to(x.dtype)

    def _apply(self, fn, recurse=True):
        """Moves and casts (``.to``, ``.half()``) reach the bias only: the codes keep their dtypes."""
        kept = {n: b for n, b in self._buffers.items() if n == "weight" or n.startswith(FIELD_PREFIX)}
        for n in kept:
            del self._buffers[n]
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)

    def entry(self) -> dict[str, Any]:
        """The JSON that lets a loader build this layer's shell (codec, shape, payload fields, checksum)."""
        enc = self.encoded
        return {"codec": dict(enc.codec.get_config()), "shape": list(enc.shape), "conv1d": self.conv1d,
                "source": enc.source, "sha256": enc.checksum,
                "fields": {f: [list(a.shape), np.dtype(a.dtype).str] for f, a in sorted(enc.payload.items())}}

    def extra_repr(self) -> str:
        return super().extra_repr() + (", conv1d=True" if self.conv1d else "")
