"""Training form (``rbe_core.training.TorchForm``) of the ``hadamard`` codec.

The codes stay fixed; the scales train, in the log domain so one learning rate moves every layer
by the same relative amount:

- ``log_row_scale`` (rows,): ``row_scale = exp(·)``, written back as float32 (exact);
- ``log_scale`` (rows, groups): the group's step multiplier ``scale_code = exp(·)``, written back
  rounded to its uint8 code (0..255), so training sees it straight through the rounding.

``decode`` mirrors ``HadamardCodec.decode_rows`` in torch: unpack the ``bits``-bit codes, subtract
the mid-rise offset, multiply by ``row_scale · scale_code`` per group (the steps in the rotated
basis), then apply the inverse rotation (block-wise orthonormal Walsh–Hadamard, then the ±1 signs)
and drop the padded columns. All-zero rows and groups (scale 0) stay exactly zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rbe_core.abc import Encoded
from rbe_core.training import TorchForm, as_numpy

from .hadamard import unpack_codes

#: log of a zero scale: exp() of it underflows to 0 in float32 and float64 alike.
_LOG_ZERO = -1000.0


def _log(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.where(v > 0, np.log(np.where(v > 0, v, 1.0)), _LOG_ZERO)


def torch_fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform (Sylvester order, as ``hadamard.fwht``) on the last axis."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(y.shape[0], n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(*lead, n)


def torch_unrotate(x: torch.Tensor, signs: np.ndarray, blocks: list[int]) -> torch.Tensor:
    """Rows of ``x`` times ``R`` (``hadamard.unrotate`` in torch, differentiable)."""
    parts, start = [], 0
    for b in blocks:
        parts.append(torch_fwht(x[..., start:start + b]) * (1.0 / math.sqrt(b)))
        start += b
    return torch.cat(parts, -1) * torch.from_numpy(signs).to(x.device, x.dtype)


class HadamardForm(TorchForm):
    """The ``hadamard`` codec's scales as trainable log-domain parameters (see the module docstring)."""

    fields = ("log_row_scale", "log_scale")

    def params(self, encoded: Encoded) -> dict[str, np.ndarray]:
        p = encoded.payload
        return {"log_row_scale": _log(p["row_scale"]), "log_scale": _log(p["scale_code"])}

    def decode(self, encoded: Encoded, params) -> torch.Tensor:
        codec = encoded.codec
        rows, cols = encoded.matrix_shape
        cols_p, signs, blocks = codec.layout(cols)
        log_row, log_group = params["log_row_scale"], params["log_scale"]
        q = torch.from_numpy(unpack_codes(encoded.payload["codes"], cols_p, codec.bits)).to(log_row.device)
        centred = q.to(log_row.dtype) - (2**codec.bits - 1) / 2.0
        steps = torch.exp(log_row)[:, None] * torch.exp(log_group)
        wr = (centred.reshape(rows, -1, codec.group_size) * steps[..., None]).reshape(rows, cols_p)
        return torch_unrotate(wr, signs, blocks)[:, :cols]

    def write(self, encoded: Encoded, params) -> Encoded:
        row_scale = np.exp(as_numpy(params["log_row_scale"])).astype(np.float32)
        code = np.clip(np.rint(np.exp(as_numpy(params["log_scale"]))), 0, 255).astype(np.uint8)
        payload = {"codes": encoded.payload["codes"], "scale_code": code, "row_scale": row_scale}
        new = Encoded(encoded.codec, encoded.shape, payload, dtype=encoded.dtype, source=encoded.source)
        encoded.codec.validate(new)
        return new


FORM = HadamardForm()
