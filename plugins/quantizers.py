"""Quantizers (``rbe_core.Quantizer``): ``ste``, ``lsq`` and ``codebook``.

All work on values grouped along the last axis (shape ``(..., group)``); steps, offsets and
statistics are per group (shape ``(..., 1)``). ``quantize``/``dequantize`` accept numpy or torch
and return the same kind; ``fake_quantize`` is torch and equals ``dequantize(quantize(v))``.

- ``ste``: uniform grid, straight-through estimator: d(out)/d(v) = 1 where v rounds onto the grid
  (within half a step of its range), 0 where it was clipped; steps and offsets are fixed.
- ``lsq``: the same grid with learned step size (Esser et al., 2020) and, for unsigned grids,
  a learned offset (LSQ+): d(out)/d(step) = round(u) − u inside the range (u = (v − offset)/step),
  the clip level outside, times the gradient scale 1/sqrt(group · q_max).
- ``codebook``: 2**bits centroids fitted by k-means over the whole tensor; the forward snaps each
  value to its nearest centroid, the backward passes straight through to the value and
  accumulates into the centroids (which are learnable).

``step_dtype`` (e.g. ``"float16"``) makes the forward see steps and offsets rounded to their
storage type, so finalizing into a codec reproduces the trained forward exactly.

``ste`` and ``lsq`` also take a ``levels`` table (a codec's lowered level table, any values, up to
``2**bits`` entries): codes then index the table, a value rounds to the nearest entry
(``rbe_core.native.nearest_codes``) and ``v = levels[code] · step (+ offset)``; the gradients are
the same with ``round`` read as "nearest level" and the range as the table's.

Signed grids are symmetric, codes in [−(2**(bits−1) − 1), 2**(bits−1) − 1] (int8 style); unsigned
grids are affine, codes in [0, 2**bits − 1] with ``v = code · step + offset`` (int4 style).
"""

from __future__ import annotations

import numpy as np

from rbe_core import Quantizer, hookimpl
from rbe_core.arrays import is_torch


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in 1..16, got {bits!r}")
    return bits


class UniformQuantizer(Quantizer):
    """Uniform grid with straight-through gradients (``ste``)."""

    name = "ste"
    learnable = False

    def __init__(self, bits: int = 8, signed: bool = True, step_dtype: str | None = None, levels=None):
        import torch

        self.bits, self.signed = _check_bits(bits), bool(signed)
        self.step_dtype = step_dtype  # storage type of steps/offsets, seen by the forward (STE)
        self.qmin = -(2 ** (bits - 1) - 1) if signed else 0
        self.qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.levels = None if levels is None else np.asarray(levels, dtype=np.float32)
        if self.levels is not None:
            if not 1 <= self.levels.size <= 2**bits or not np.isfinite(self.levels).all():
                raise ValueError(f"levels must be 1..{2**bits} finite values, got {self.levels.size}")
            self.qmin, self.qmax = float(self.levels.min()), float(self.levels.max())
        self.step = torch.nn.Parameter(torch.ones(1), requires_grad=self.learnable)
        self.offset = None if signed else torch.nn.Parameter(torch.zeros(1), requires_grad=self.learnable)

    def steps(self, step, offset=None) -> None:
        """Set the steps (and offsets, unsigned grids) to given values (shape ``(..., 1)``)."""
        import torch

        self.step.data = torch.as_tensor(step, dtype=torch.float32).clone()
        if not self.signed:
            base = torch.zeros_like(self.step.data) if offset is None else torch.as_tensor(offset, dtype=torch.float32)
            self.offset.data = base.clone()

    def fit(self, values) -> None:
        """Steps from the range of each group (absmax when signed, min..max when unsigned)."""
        import torch

        v = torch.as_tensor(values).detach().float()
        if self.signed:
            step = v.abs().amax(-1, keepdim=True) / self.qmax
            self.steps(torch.where(step > 0, step, torch.ones_like(step)))
        else:
            lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
            step = (hi - lo) / self.qmax
            self.steps(torch.where(step > 0, step, torch.ones_like(step)), lo)

    def stored_steps(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray | None]:
        """Round steps (and offsets) to the storage ``dtype``, keep those, return them as numpy."""
        step = self.step.detach().cpu().numpy().astype(dtype).astype(np.float32)
        offset = None if self.signed else self.offset.detach().cpu().numpy().astype(dtype).astype(np.float32)
        self.steps(step, offset)
        return step, offset

    def parameters(self) -> list:
        """The learnable tensors (empty for ``ste``)."""
        return [p for p in (self.step, self.offset) if p is not None and p.requires_grad]

    def _stored(self, t):
        """``t`` rounded to ``step_dtype`` in the forward, gradient straight through."""
        if self.step_dtype is None:
            return t
        import torch

        return t + (t.detach().to(getattr(torch, self.step_dtype)).to(t.dtype) - t.detach())

    def _affine(self, like):
        step = self._stored(self.step.detach())
        offset = 0.0 if self.signed else self._stored(self.offset.detach())
        if is_torch(like):
            return step.to(like.device, like.dtype), offset if self.signed else offset.to(like.device, like.dtype)
        return step.cpu().double().numpy(), offset if self.signed else offset.cpu().double().numpy()

    def _nearest(self, u):
        """``u`` (values in steps, inside the range) at its nearest level, and that level's code."""
        from rbe_core.native import nearest_codes

        codes = nearest_codes(self.levels, u.detach().cpu().numpy() if is_torch(u) else u)
        if not is_torch(u):
            return self.levels[codes].astype(np.float64), codes
        import torch

        return torch.from_numpy(self.levels[codes]).to(u.device, u.dtype), torch.from_numpy(codes).to(u.device)

    def quantize(self, values):
        step, offset = self._affine(values)
        if self.levels is not None:
            return self._nearest((values - offset) / step)[1]
        if is_torch(values):
            return ((values - offset) / step).round().clamp(self.qmin, self.qmax).to(self._code_dtype(torch=True))
        codes = np.clip(np.rint((np.asarray(values, dtype=np.float64) - offset) / step), self.qmin, self.qmax)
        return codes.astype(self._code_dtype(torch=False))

    def dequantize(self, codes):
        step, offset = self._affine(codes if not is_torch(codes) else codes.float())
        if self.levels is not None:
            index = codes.cpu().numpy() if is_torch(codes) else np.asarray(codes)
            table = self.levels[index.astype(np.intp)]
            if is_torch(codes):
                import torch

                return torch.from_numpy(table).to(step.device, step.dtype) * step + offset
            return table.astype(np.float64) * step + offset
        if is_torch(codes):
            return codes.to(step.dtype) * step + offset
        return np.asarray(codes, dtype=np.float64) * step + offset

    def _code_dtype(self, torch: bool):
        """Smallest integer type holding the codes (torch has no uint16: int32 there)."""
        name = f"{'int' if self.signed else 'uint'}{8 if self.bits <= 8 else 16}"
        if not torch:
            return np.dtype(name)
        import torch as t

        return {"int8": t.int8, "uint8": t.uint8, "int16": t.int16, "uint16": t.int32}[name]

    def _round(self, u):
        """``u`` on the grid: the nearest level, or the clamped integer."""
        if self.levels is not None:
            return self._nearest(u.clamp(self.qmin, self.qmax))[0]
        return u.round().clamp(self.qmin, self.qmax)

    def fake_quantize(self, values):
        step, offset = self._affine(values)
        u = (values - offset) / step
        half = 0.0 if self.levels is not None else 0.5
        inside = ((u >= self.qmin - half) & (u <= self.qmax + half)).to(values.dtype)
        out = self._round(u.detach()) * step + offset
        # forward: the grid value; backward: 1 inside the range, 0 where clipped
        return out + (values - values.detach()) * inside


class LSQQuantizer(UniformQuantizer):
    """Uniform grid with learned step size (and offset when unsigned): LSQ / LSQ+."""

    name = "lsq"
    learnable = True

    def fake_quantize(self, values):
        g = 1.0 / float(np.sqrt(values.shape[-1] * self.qmax))
        step = self._stored(_scale_grad(self.step.to(values.dtype), g))
        offset = 0.0 if self.signed else self._stored(_scale_grad(self.offset.to(values.dtype), g))
        u = ((values - offset) / step).clamp(self.qmin, self.qmax)
        u = u + (self._round(u.detach()) - u).detach()  # round with a straight-through gradient
        return u * step + offset


def _scale_grad(t, scale: float):
    """``t`` in the forward, gradient multiplied by ``scale`` in the backward."""
    return (t - t * scale).detach() + t * scale


class CodebookQuantizer(Quantizer):
    """A k-means codebook of 2**bits scalar centroids; nearest-centroid forward, STE backward."""

    name = "codebook"

    def __init__(self, bits: int = 4, iters: int = 25, sample: int = 1 << 16, seed: int = 0):
        import torch

        self.bits = _check_bits(bits)
        self.iters, self.sample, self.seed = iters, sample, seed
        self.centroids = torch.nn.Parameter(torch.zeros(2**self.bits))

    def fit(self, values) -> None:
        """Lloyd's k-means on (a sample of) the values, initialised at their quantiles."""
        import torch

        v = torch.as_tensor(values).detach().reshape(-1).double().cpu().numpy()
        if v.size > self.sample:
            v = np.random.default_rng(self.seed).choice(v, self.sample, replace=False)
        k = 2**self.bits
        c = np.quantile(v, (np.arange(k) + 0.5) / k)
        for _ in range(self.iters):
            idx = self._nearest(v, c)
            sums = np.bincount(idx, weights=v, minlength=k)
            counts = np.bincount(idx, minlength=k)
            c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
            c.sort()
        self.centroids.data = torch.from_numpy(c).float()

    @staticmethod
    def _nearest(v: np.ndarray, c: np.ndarray) -> np.ndarray:
        mid = (c[1:] + c[:-1]) / 2
        return np.searchsorted(mid, v)

    def parameters(self) -> list:
        return [self.centroids]

    def quantize(self, values):
        import torch

        if is_torch(values):
            c = self.centroids.detach().to(values.device, values.dtype)
            c_sorted, order = torch.sort(c)
            idx = torch.bucketize(values.detach(), (c_sorted[1:] + c_sorted[:-1]) / 2)
            return order[idx].to(torch.uint8 if self.bits <= 8 else torch.int32)
        c = self.centroids.detach().double().cpu().numpy()
        order = np.argsort(c)
        idx = order[self._nearest(np.asarray(values, dtype=np.float64), c[order])]
        return idx.astype(np.uint8 if self.bits <= 8 else np.uint16)

    def dequantize(self, codes):
        if is_torch(codes):
            return self.centroids.detach().to(codes.device)[codes.long()]
        return self.centroids.detach().double().cpu().numpy()[np.asarray(codes, dtype=np.int64)]

    def fake_quantize(self, values):
        idx = self.quantize(values).long()
        snapped = self.centroids.to(values.dtype)[idx]  # gradient flows into the centroids
        return snapped + (values - values.detach())  # and straight through to the values


@hookimpl
def rbe_register_quantizers(register):
    register(UniformQuantizer)
    register(LSQQuantizer)
    register(CodebookQuantizer)
