"""The canonical lowered layout in torch (CPU or CUDA): a tensor's arrays on a device, row
chunks of ``W_c``, and the block-Hadamard rotation as small matmuls. Shared by the torch
backend's kernels and the training form derived from lowering; imports torch."""

from __future__ import annotations

import warnings

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from .lowering import Lowered


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


def _sylvester(m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    h = torch.ones((1, 1), dtype=dtype)
    while h.shape[0] < m:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h.to(device)


def hadamard_factors(blocks: list[int], device: torch.device,
                     dtype: torch.dtype = torch.float32) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per block b = b1 * b2: Sylvester ``H_b1`` and ``H_b2 / sqrt(b)`` (``H_b = H_b1 ⊗ H_b2``)."""
    out = []
    for b in blocks:
        b1 = 1 << ((b.bit_length() - 1) // 2)
        out.append((b, _sylvester(b1, device, dtype), _sylvester(b // b1, device, dtype) * (1.0 / b**0.5)))
    return out


def fwht_blocks(x: torch.Tensor, factors) -> torch.Tensor:
    """Orthonormal block-diagonal Walsh–Hadamard transform along the last axis of (…, cols_p):
    each block as two small matmuls, ``H_b1 @ X @ H_b2`` on the block viewed as (b1, b2) (the
    torch twin of ``rbe_core.native.lowering.fwht_blocks``)."""
    rows = x.reshape(-1, x.shape[-1])
    parts, start = [], 0
    for b, h1, h2 in factors:
        y = rows[:, start : start + b].reshape(rows.shape[0], h1.shape[0], -1)
        parts.append(torch.matmul(h1, y @ h2).reshape(rows.shape[0], b))
        start += b
    out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    return out.reshape(x.shape)


