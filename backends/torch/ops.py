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
import warnings
import weakref

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from rbe_core.abc import Encoded
from rbe_core.native import generic, lower
from rbe_core.native.lowering import Lowered

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


def _t(a: np.ndarray, device: torch.device) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # a read-only view of the mapped .rbe file: these tensors are only read
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(a).to(device)
    return torch.from_numpy(a).to(device)


@attrs.frozen(eq=False)
class TorchLowered:
    """A lowered tensor's arrays on one device (see the module docstring)."""

    rows: int
    cols: int
    cols_p: int
    bits: int
    group_size: int
    codes: torch.Tensor | None  # uint8 (rows, cols_p), or (rows, cols_p // 2) nibble pairs
    nibbles: bool
    levels: torch.Tensor | None
    affine: tuple[float, float] | None  # levels[i] == a0 + i * da exactly: (a0, da)
    step: torch.Tensor | None  # float32 (rows, groups)
    offset: torch.Tensor | None
    dense: torch.Tensor | None  # float32 (rows, cols_p) when bits == 32
    signs: torch.Tensor | None
    factors: list | None

    def values(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of ``W_c`` (float32, cols_p wide), into ``out`` when given."""
        n = stop - start
        if self.dense is not None:
            return self.dense[start:stop]
        c = self.codes[start:stop]
        if self.nibbles:
            c = torch.stack((c & 15, c >> 4), -1).view(n, -1)
        w = out.view(n, self.cols_p) if out is not None else torch.empty(
            (n, self.cols_p), dtype=torch.float32, device=c.device)
        if self.affine is not None:
            w.copy_(c).mul_(self.affine[1]).add_(self.affine[0])
        else:
            torch.index_select(self.levels, 0, c.reshape(-1).int(), out=w.view(-1))
        gs, groups = self.group_size, self.step.shape[1]
        if groups * gs == self.cols_p:
            w.view(n, groups, gs).mul_(self.step[start:stop, :, None])
            if self.offset is not None:
                w.view(n, groups, gs).add_(self.offset[start:stop, :, None])
        else:
            col_group = torch.arange(self.cols_p, device=w.device) // gs
            w.mul_(self.step[start:stop][:, col_group])
            if self.offset is not None:
                w.add_(self.offset[start:stop][:, col_group])
        return w

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """(n, cols) -> (n, cols_p): padded, then rotated when there is a transform."""
        xp = F.pad(x, (0, self.cols_p - x.shape[1])) if x.shape[1] != self.cols_p else x
        return xp if self.signs is None else fwht_blocks(xp * self.signs, self.factors)

    def unrotate(self, acc: torch.Tensor) -> torch.Tensor:
        """(n, cols_p) ``@ T``, cut to ``cols``."""
        if self.signs is not None:
            acc = fwht_blocks(acc, self.factors) * self.signs
        return acc[:, : self.cols]


def _affine(levels: np.ndarray) -> tuple[float, float] | None:
    a0, da = np.float32(levels[0]), np.float32(levels[1] - levels[0])
    i = np.arange(len(levels), dtype=np.float32)
    return (float(a0), float(da)) if np.array_equal(i * da + a0, levels) else None


def prepare(low: Lowered, device: torch.device) -> TorchLowered:
    """``low``'s arrays as tensors on ``device`` (codes packed two per byte up to 4 bits)."""
    t = low.transform
    common = {"rows": low.rows, "cols": low.cols, "cols_p": low.cols_p, "bits": low.bits,
              "signs": None if t is None else _t(t.signs, device),
              "factors": None if t is None else hadamard_factors(list(t.blocks), device)}
    if low.bits == 32:
        return TorchLowered(**common, group_size=low.cols_p, codes=None, nibbles=False, levels=None, affine=None,
                            step=None, offset=None, dense=_t(low.dense.astype(np.float32), device))
    nibbles = low.bits <= 4 and low.cols_p % 2 == 0
    codes = low.codes[:, 0::2] | (low.codes[:, 1::2] << 4) if nibbles else low.codes
    levels = np.ascontiguousarray(low.levels, dtype=np.float32)
    return TorchLowered(**common, group_size=low.group_size, codes=_t(codes, device), nibbles=nibbles,
                        levels=_t(levels, device), affine=_affine(levels), step=_t(low.step, device),
                        offset=None if low.offset is None else _t(low.offset, device), dense=None)


def prepared(encoded: Encoded, device: torch.device) -> TorchLowered | None:
    """The lowered tensor on ``device``, built once per pair; None when the codec does not lower."""
    per_device = _PREPARED.setdefault(encoded, {})
    key = str(device)
    if key not in per_device:
        low = lower(encoded, cache=False)
        per_device[key] = None if low is None else prepare(low, device)
    return per_device[key]


def _sylvester(m: int, device: torch.device) -> torch.Tensor:
    h = torch.ones((1, 1), dtype=torch.float32)
    while h.shape[0] < m:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h.to(device)


def hadamard_factors(blocks: list[int], device: torch.device) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per block b = b1 * b2: Sylvester ``H_b1`` and ``H_b2 / sqrt(b)`` (``H_b = H_b1 ⊗ H_b2``)."""
    out = []
    for b in blocks:
        b1 = 1 << ((b.bit_length() - 1) // 2)
        out.append((b, _sylvester(b1, device), _sylvester(b // b1, device) * (1.0 / b**0.5)))
    return out


def fwht_blocks(x: torch.Tensor, factors) -> torch.Tensor:
    """Orthonormal block-diagonal Walsh–Hadamard transform along the last axis of (n, cols_p):
    each block as two small matmuls, ``H_b1 @ X @ H_b2`` on the block viewed as (b1, b2)."""
    parts, start = [], 0
    for b, h1, h2 in factors:
        y = x[:, start : start + b].reshape(x.shape[0], h1.shape[0], -1)
        parts.append(torch.matmul(h1, y @ h2).reshape(x.shape[0], b))
        start += b
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


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
