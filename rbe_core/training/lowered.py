"""The training form every codec gets from its lowered layout (``Codec.lower`` + ``Codec.from_lowered``).

Trainable parameters are the lowered continuous fields the codec stores
(``Codec.trainable_lowered``, of ``step``, ``offset``, ``levels``); the codes stay. Steps train
in the log domain (field ``log_step``; each step keeps its sign, a zero step stays zero), so one
learning rate moves every group by the same relative amount. ``decode`` is
``levels[codes] · step (+ offset)`` per group in torch, then the inverse input transform (block
Hadamard) and the cut to the matrix width; ``write`` hands the trained values to
``Codec.from_lowered``, which rounds them to their storage types. For quantization-aware
training (``QATLinear``) the grid is the codec's own level table with its steps and offsets, in
the lowered basis ``W_c`` (before the transform): the quantizer re-chooses codes and
``pack`` writes them back through ``from_lowered``.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..abc import Encoded
from ..errors import RBEError
from ..native.lowering import Lowered, lower
from ..native.torch_lowered import fwht_blocks, hadamard_factors
from .forms import TorchForm, as_numpy

_CODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: log of a zero step: exp() of it underflows to 0 in float32 and float64 alike.
_LOG_ZERO = -1000.0


def _lowered(encoded: Encoded) -> Lowered:
    low = lower(encoded)
    if low is None or low.bits == 32:
        raise RBEError(f"{encoded.codec.codec_id}: this tensor has no coded lowered layout to train")
    return low


class LoweredForm(TorchForm):
    """A ``TorchForm`` read from the lowered layout (see the module docstring)."""

    step_dtype = "float32"

    def __init__(self, codec=None):
        trainable = ("step", "offset") if codec is None else tuple(codec.trainable_lowered)
        names = {"step": "log_step", "offset": "offset", "levels": "levels"}
        self.fields = tuple(names[f] for f in ("step", "offset", "levels") if f in trainable)
        self.row_wise = "levels" not in self.fields

    def params(self, encoded: Encoded) -> dict[str, np.ndarray]:
        low = _lowered(encoded)
        out = {}
        for f in self.fields:
            if f == "log_step":
                step = np.abs(low.step.astype(np.float64))
                with np.errstate(divide="ignore"):
                    out[f] = np.where(step > 0, np.log(np.where(step > 0, step, 1.0)), _LOG_ZERO)
            elif getattr(low, f) is not None:
                out[f] = getattr(low, f).astype(np.float64)
        return out

    @staticmethod
    def _step(low: Lowered, log_step):
        """Steps from their logs, with the stored signs (torch or numpy)."""
        sign = np.where(low.step < 0, -1.0, 1.0)
        if isinstance(log_step, torch.Tensor):
            return torch.exp(log_step) * torch.from_numpy(sign).to(log_step.device, log_step.dtype)
        return np.exp(log_step) * sign

    def _codes(self, encoded: Encoded, device: torch.device) -> torch.Tensor:
        per = _CODES.setdefault(encoded, {})
        if str(device) not in per:
            per[str(device)] = torch.from_numpy(_lowered(encoded).codes.astype(np.int64)).to(device)
        return per[str(device)]

    def basis_values(self, encoded: Encoded, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``W_c`` (rows, cols_p) from ``params`` (fields not given: the stored values)."""
        low = _lowered(encoded)
        like = next(iter(params.values()))

        def field(name):
            value = params.get(name)
            if value is None and getattr(low, name) is not None:
                value = torch.from_numpy(np.array(getattr(low, name))).to(like.device, like.dtype)
            return value

        step = self._step(low, params["log_step"]) if "log_step" in params else field("step")
        col_group = torch.arange(low.cols_p, device=like.device) // low.group_size
        w = field("levels")[self._codes(encoded, like.device)] * step[:, col_group]
        offset = field("offset")
        return w if offset is None else w + offset[:, col_group]

    def from_basis(self, encoded: Encoded, w_c: torch.Tensor) -> torch.Tensor:
        """The (rows, cols) weight of basis values ``W_c``: the inverse transform, then the cut."""
        low = lower(encoded)
        t = low.transform
        if t is not None:
            signs = torch.from_numpy(t.signs).to(w_c.device, w_c.dtype)
            factors = hadamard_factors(list(t.blocks), w_c.device, w_c.dtype)
            w_c = fwht_blocks(w_c, factors) * signs
        return w_c[:, : low.cols]

    def decode(self, encoded: Encoded, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not params:
            raise RBEError(f"{encoded.codec.codec_id}: no lowered field is trainable (Codec.trainable_lowered)")
        return self.from_basis(encoded, self.basis_values(encoded, params))

    def write(self, encoded: Encoded, params: Mapping[str, Any]) -> Encoded:
        low = _lowered(encoded)
        values = {f: as_numpy(v) for f, v in params.items()}
        if "log_step" in values:
            values["step"] = self._step(low, values.pop("log_step"))
        new = low.with_values(**{f: v.astype(np.float32).reshape(getattr(low, f).shape) for f, v in values.items()})
        return encoded.codec.from_lowered(encoded, new)

    # quantization-aware training on the codec's own level table

    def grid(self, encoded: Encoded):
        low = _lowered(encoded)
        return (low.bits, low.offset is None, low.group_size)

    def grid_levels(self, encoded: Encoded) -> np.ndarray:
        return _lowered(encoded).levels

    def grid_steps(self, encoded: Encoded) -> tuple[np.ndarray, np.ndarray | None]:
        low = _lowered(encoded)
        return low.step.astype(np.float64), None if low.offset is None else low.offset.astype(np.float64)

    def basis(self, encoded: Encoded) -> np.ndarray:
        low = _lowered(encoded)
        return low.values(0, low.rows)

    def pack(self, encoded: Encoded, codes: np.ndarray, step: np.ndarray, offset: np.ndarray | None) -> Encoded:
        low = _lowered(encoded)
        new = low.with_values(codes=np.ascontiguousarray(np.asarray(codes).reshape(low.rows, -1)[:, : low.cols_p],
                                                         dtype=np.uint8),
                              step=np.asarray(step, np.float32).reshape(low.step.shape),
                              offset=None if offset is None else np.asarray(offset, np.float32).reshape(low.step.shape))
        return encoded.codec.from_lowered(encoded, new)
