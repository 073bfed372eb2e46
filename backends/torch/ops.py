"""Kernels in torch ops (CPU or CUDA) on the canonical lowered layout, row chunk by row chunk.

Every codec that lowers (``Codec.lower``) runs here: per (tensor, device) the lowered arrays
are prepared once (codes kept one per byte, or two per byte up to 4 bits: the memory of the
file's own codes; float32 level table, steps, offsets; the block-Hadamard transform as two small
matmuls per block). ``linear`` pads and rotates the input once, then multiplies row chunks of
``W_c = levels[codes] * step (+ offset)`` (an affine level table skips the lookup);
``grad_input`` accumulates ``g @ W_c`` and applies the inverse rotation. Dense (32-bit) lowered
tensors multiply their float32 rows. Codecs that do not lower decode rows with their numpy code
(the generic path, ``rbe_core.native.generic``) and copy them over.

Memory budget: a call materialises at most ``chunk_elements(device)`` decoded float32 weights
at once (``RBE_TORCH_CHUNK_MB`` MiB of float32, default 4 MiB on CPU, where a chunk that stays
in cache is fastest, and 64 MiB on CUDA, where fewer and larger launches win), never the whole
weight.
"""

from __future__ import annotations

import os
import weakref

import numpy as np
import torch

from rbe_core.abc import Encoded
from rbe_core.native import generic, lower
from rbe_core.native.torch_lowered import TorchLowered, prepare

CHUNK_ENV = "RBE_TORCH_CHUNK_MB"
#: Default decoded-weight budget per call in MiB of float32, by device type.
DEFAULT_CHUNK_MB = {"cpu": 4, "cuda": 64}

_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chunk_elements(device: torch.device) -> int:
    """Decoded float32 weights one call may hold at once on ``device`` (``$RBE_TORCH_CHUNK_MB``)."""
    value = os.environ.get(CHUNK_ENV, "").strip()
    if value:
        try:
            mb = float(value)
        except ValueError:
            mb = -1.0
        if not mb > 0:
            raise ValueError(f"{CHUNK_ENV}={value!r}: expected a positive number of MiB")
    else:
        mb = DEFAULT_CHUNK_MB.get(device.type, DEFAULT_CHUNK_MB["cuda"])
    return max(1, int(mb * (1 << 20)) // 4)


def row_steps(rows: int, cols: int, device: torch.device):
    """(start, stop) row ranges whose decoded float32 size fits the device's budget."""
    step = max(1, chunk_elements(device) // max(cols, 1))
    return [(s, min(rows, s + step)) for s in range(0, rows, step)]


def prepared(encoded: Encoded, device: torch.device) -> TorchLowered | None:
    """The lowered tensor on ``device``, built once per pair; None when the codec does not lower."""
    per_device = _PREPARED.setdefault(encoded, {})
    key = str(device)
    if key not in per_device:
        low = lower(encoded, cache=False)
        per_device[key] = None if low is None else prepare(low, device)
    return per_device[key]


def _buffer(steps, width: int, like: torch.Tensor) -> torch.Tensor:
    """One float32 scratch chunk reused by every step of a call (a fresh allocation per chunk
    costs page faults that can exceed the arithmetic on CPU)."""
    return torch.empty(max(e - s for s, e in steps) * width, dtype=torch.float32, device=like.device)


def _steps(p: TorchLowered, device: torch.device):
    """Row chunks within budget at the padded width; the level lookup holds int32 indices (the
    size of the float32 chunk) too."""
    return row_steps(p.rows, p.cols_p * (1 if p.dense is not None or p.affine is not None else 2), device)


def decode_rows(encoded: Encoded, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` of the (rows, cols) weight as float32 on ``device``, exactly the codec's
    decode (a rotated layout is decoded by the codec's numpy code: the FWHT's order of additions
    is part of the result)."""
    p = prepared(encoded, device)
    if p is None or p.signs is not None:
        return torch.from_numpy(np.ascontiguousarray(encoded.decode_rows(start, stop))).to(device)
    return p.values(start, stop).clone()[:, : p.cols]


def linear(x: torch.Tensor, encoded: Encoded) -> torch.Tensor:
    """(n, in) @ W.T -> (n, out), float32 on x's device."""
    rows, cols = encoded.matrix_shape
    out = torch.empty((x.shape[0], rows), dtype=torch.float32, device=x.device)
    p = prepared(encoded, x.device)
    if p is None:
        for s, e, w in generic.decoded_chunks(encoded, "torch"):
            torch.matmul(x, torch.from_numpy(w).to(x.device).T, out=out[:, s:e])
        return out
    xr = p.rotate(x)
    steps = _steps(p, x.device)
    buf = None if p.dense is not None else _buffer(steps, p.cols_p, x)
    for s, e in steps:
        w = p.values(s, e, None if buf is None else buf[: (e - s) * p.cols_p])
        o = out[:, s:e]
        if o.is_contiguous():  # batch 1: straight into the output
            torch.mm(xr, w.T, out=o)
        else:
            o.copy_(xr @ w.T)
    return out


def grad_input(grad_out: torch.Tensor, encoded: Encoded) -> torch.Tensor:
    """(n, out) @ W -> (n, in)."""
    rows, cols = encoded.matrix_shape
    p = prepared(encoded, grad_out.device)
    if p is None:
        out = torch.zeros((grad_out.shape[0], cols), dtype=torch.float32, device=grad_out.device)
        for s, e, w in generic.decoded_chunks(encoded, "torch"):
            out.addmm_(grad_out[:, s:e], torch.from_numpy(w).to(grad_out.device))
        return out
    acc = torch.zeros((grad_out.shape[0], p.cols_p), dtype=torch.float32, device=grad_out.device)
    steps = _steps(p, grad_out.device)
    buf = None if p.dense is not None else _buffer(steps, p.cols_p, grad_out)
    for s, e in steps:
        acc.addmm_(grad_out[:, s:e], p.values(s, e, None if buf is None else buf[: (e - s) * p.cols_p]))
    return p.unrotate(acc).contiguous()
