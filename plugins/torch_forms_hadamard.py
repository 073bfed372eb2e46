"""Training form (``rbe_core.training.TorchForm``) of the ``hadamard`` codec.

The codes stay fixed; the scales train, in the log domain so one learning rate moves every layer
by the same relative amount:

- ``log_row_scale`` (rows,): ``row_scale = exp(·)``, written back as float32 (exact);
- ``log_scale`` (rows, groups): the group's step multiplier ``scale_code = exp(·)``, written back
  rounded to its uint8 code (0..255), so training sees it straight through the rounding.

``decode`` mirrors ``HadamardCodec.decode_rows`` in torch: unpack the ``bits``-bit codes, look up
their grid values (``codec.levels()``), multiply by ``row_scale · scale_code`` per group (the steps in the rotated
basis), then apply the inverse rotation (block-wise orthonormal Walsh–Hadamard, then the ±1 signs)
and drop the padded columns. All-zero rows and groups (scale 0) stay exactly zero.

``linear`` is the training path (``TrainableRBELinear`` uses it): it rotates the activations
instead of the weight (``x @ W.T == rotate(x) @ W_rot.T``), so a step costs about a dense
step, where differentiating ``decode`` costs a Hadamard transform of every weight, twice.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn.functional as F

from rbe_core.abc import Encoded
from rbe_core.native.torch_lowered import fwht_blocks, hadamard_factors
from rbe_core.training.forms import TorchForm, as_numpy

from ._blocks import code_entry
from ._hadamard_codes import payload_codes, stored_codes

#: log of a zero scale: exp() of it underflows to 0 in float32 and float64 alike.
_LOG_ZERO = -1000.0


def _log(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.where(v > 0, np.log(np.where(v > 0, v, 1.0)), _LOG_ZERO)


def _blockwise(x: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    """The block-diagonal orthonormal Hadamard transform of ``x``'s rows, in ``x``'s dtype."""
    return fwht_blocks(x, hadamard_factors(blocks, x.device, x.dtype))


class _Unrotate(torch.autograd.Function):
    """``x ↦ x · R`` with ``R = B · diag(signs)``, B the block-diagonal orthonormal (symmetric)
    Hadamard; its vector-Jacobian product is ``g ↦ g · Rᵀ = blockwise(g · signs)`` (the rotation)."""

    @staticmethod
    def forward(ctx, x, signs, blocks):
        ctx.signs, ctx.blocks = signs, blocks
        return _blockwise(x, blocks) * signs

    @staticmethod
    def backward(ctx, grad):
        return _blockwise(grad * ctx.signs, ctx.blocks), None, None


def torch_unrotate(x: torch.Tensor, signs: np.ndarray, blocks: list[int]) -> torch.Tensor:
    """Rows of ``x`` times ``R`` (``hadamard.unrotate`` in torch; differentiable, one FWHT per pass)."""
    return _Unrotate.apply(x, torch.from_numpy(signs).to(x.device, x.dtype), blocks)


def _levels(codec, like: torch.Tensor) -> torch.Tensor:
    """The codec's code values (``codec.levels()``) as a tensor of ``like``'s dtype and device."""
    return torch.from_numpy(codec.levels()).to(like.device, like.dtype)


class _CodeCache:
    """Unpacked codes per packed codes array (``codes`` or ``nibbles``: shared by every rewrite of
    a trained layer), dropped when that array is freed."""

    def __init__(self):
        self._items: dict[int, np.ndarray] = {}

    def get(self, payload, n: int, bits: int) -> np.ndarray:
        packed = stored_codes(payload)
        key = id(packed)
        if key not in self._items:
            self._items[key] = payload_codes(payload, n, bits)
            weakref.finalize(packed, self._items.pop, key, None)
        return self._items[key]


_CODES = _CodeCache()


class HadamardForm(TorchForm):
    """The ``hadamard`` codec's scales as trainable log-domain parameters (see the module docstring)."""

    fields = ("log_row_scale", "log_scale")
    row_wise = True

    def params(self, encoded: Encoded) -> dict[str, np.ndarray]:
        p = encoded.payload
        return {"log_row_scale": _log(p["row_scale"]), "log_scale": _log(p["scale_code"])}

    def decode(self, encoded: Encoded, params) -> torch.Tensor:
        codec = encoded.codec
        rows, cols = encoded.matrix_shape
        cols_p, signs, blocks = codec.layout(cols)
        log_row, log_group = params["log_row_scale"], params["log_scale"]
        q = torch.from_numpy(_CODES.get(encoded.payload, cols_p, codec.bits)).to(log_row.device)
        centred = _levels(codec, log_row)[q.long()]
        steps = torch.exp(log_row)[:, None] * torch.exp(log_group)
        wr = (centred.reshape(rows, -1, codec.group_size) * steps[..., None]).reshape(rows, cols_p)
        return torch_unrotate(wr, signs, blocks)[:, :cols]

    def linear(self, x: torch.Tensor, encoded: Encoded, params, transposed: bool = False) -> torch.Tensor:
        """``x @ W.T`` (``x @ W`` when ``transposed``) in the rotated basis, ``W = W_rot · R``: the
        activations are rotated instead of the weight, and the group scales are seen rounded to
        their uint8 codes (straight through), so the forward is the stored model's."""
        codec = encoded.codec
        rows, cols = encoded.matrix_shape
        cols_p, signs, blocks = codec.layout(cols)
        log_row = params["log_row_scale"]
        scale = torch.exp(params["log_scale"])
        scale = scale + (torch.clamp(torch.round(scale), 0, 255) - scale).detach()
        q = torch.from_numpy(_CODES.get(encoded.payload, cols_p, codec.bits)).to(log_row.device)
        centred = _levels(codec, log_row)[q.long()]
        steps = torch.exp(log_row)[:, None] * scale
        w_rot = (centred.reshape(rows, -1, codec.group_size) * steps[..., None]).reshape(rows, cols_p)
        sign = torch.from_numpy(signs).to(x.device, x.dtype)
        if transposed:
            return (_blockwise(x @ w_rot.to(x.dtype), blocks) * sign)[..., :cols]
        xr = _blockwise(F.pad(x, (0, cols_p - cols)) * sign, blocks)
        return xr @ w_rot.to(x.dtype).T

    def write(self, encoded: Encoded, params) -> Encoded:
        row_scale = np.exp(as_numpy(params["log_row_scale"])).astype(np.float32)
        code = np.clip(np.rint(np.exp(as_numpy(params["log_scale"]))), 0, 255).astype(np.uint8)
        payload = {**code_entry(encoded.payload, "codes"), "scale_code": code, "row_scale": row_scale}
        new = Encoded(encoded.codec, encoded.shape, payload, dtype=encoded.dtype, source=encoded.source)
        encoded.codec.validate(new)
        return new


FORM = HadamardForm()
