"""Shared machinery of the packed block codes (``packed64``, ``packed128``; seeds 000 and 004).

Each B x B block of the (rows, cols) view (edge-padded to whole blocks) is one separable
sinusoidal atom read through the sin derivative cycle (Z/4: sin, cos, −sin, −cos):

    w(i, j) = r · ( S[d_y](ω_y·i + ψ) · S[d_x](ω_x·j + θ) + δ ),    S[d](t) = sin(t + d·π/2)

with i, j = 0..B-1 the position inside the block, phases θ, ψ in [0, π/2) and the quarter turns
held in the 2-bit derivative orders d_x, d_y. ``δ`` is a DC level (packed128 only).

The encoder fits the atom to the block's leading singular pair: each singular vector gets the best
``a·sin(ωt) + b·cos(ωt)`` over a grid of ω in [0, π] refined by parabolic interpolation.
Subclasses define the bit layout through ``pack``/``unpack``; decoding is float64, cast to float32.
"""

from __future__ import annotations

import abc
import functools
from typing import ClassVar

import attrs
import numpy as np

from rbe_core import Codec, Encoded, Geometry
from rbe_core.abc import check_payload
from rbe_core.arrays import as_weight, matrix_shape
from rbe_core.errors import RBEFormatError

from ._blocks import (
    check_float16_range,
    from_blocks,
    pad_blocks,
    round_up,
    rows_from_block_rows,
    to_blocks,
)

HALF_PI = np.pi / 2
PARAMS = ("r", "omega_x", "theta", "d_x", "omega_y", "psi", "d_y", "dc")


def block_size_validator(_inst, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 256:
        raise ValueError(f"{attribute.name} must be an integer in [2, 256], got {value!r}")


@functools.lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Frequency grid, its sin and cos tables (G, n) and pseudo-inverse Gram matrices (G, 2, 2)."""
    omega = np.linspace(0.0, np.pi, 8 * n + 1)
    t = np.arange(n, dtype=np.float64)
    s, c = np.sin(np.outer(omega, t)), np.cos(np.outer(omega, t))
    gram = np.stack([np.stack([(s * s).sum(1), (s * c).sum(1)], -1), np.stack([(s * c).sum(1), (c * c).sum(1)], -1)], 1)
    return omega, s, c, np.linalg.pinv(gram)


def _fit_sinusoid(u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``u`` (m, n): (ω, amplitude A, phase φ in [0, 2π)) of the best A·sin(ωt + φ)."""
    m, n = u.shape
    omega, s, c, ginv = _grid(n)
    p = np.stack([u @ s.T, u @ c.T], -1)  # (m, G, 2)
    energy = np.einsum("mgi,gij,mgj->mg", p, ginv, p)
    best = np.argmax(energy, axis=1)
    # parabolic refinement between grid neighbours
    lo, hi = np.clip(best - 1, 0, len(omega) - 1), np.clip(best + 1, 0, len(omega) - 1)
    rows = np.arange(m)
    e0, e1, e2 = energy[rows, lo], energy[rows, best], energy[rows, hi]
    denom = e0 - 2 * e1 + e2
    step = np.where((hi > lo + 1) & (denom < 0), 0.5 * (e0 - e2) / np.where(denom < 0, denom, -1.0), 0.0)
    w = np.clip(omega[best] + step * (omega[1] - omega[0]), 0.0, np.pi)
    t = np.arange(n, dtype=np.float64)
    sv, cv = np.sin(np.outer(w, t)), np.cos(np.outer(w, t))
    g = np.stack([np.stack([(sv * sv).sum(1), (sv * cv).sum(1)], -1), np.stack([(sv * cv).sum(1), (cv * cv).sum(1)], -1)], 1)
    ab = np.einsum("mij,mj->mi", np.linalg.pinv(g), np.stack([(u * sv).sum(1), (u * cv).sum(1)], -1))
    amp = np.hypot(ab[:, 0], ab[:, 1])
    phase = np.mod(np.arctan2(ab[:, 1], ab[:, 0]), 2 * np.pi)
    return w, amp, phase


def _fit_once(x: np.ndarray, mean: np.ndarray) -> dict[str, np.ndarray]:
    u, sig, vt = np.linalg.svd(x - mean[:, None, None])
    wy, ay, py = _fit_sinusoid(u[:, :, 0])
    wx, ax, px = _fit_sinusoid(vt[:, 0, :])
    r = sig[:, 0] * ay * ax
    dy, dx = np.floor(py / HALF_PI).astype(np.int64) % 4, np.floor(px / HALF_PI).astype(np.int64) % 4
    psi, theta = np.clip(py - dy * HALF_PI, 0, HALF_PI), np.clip(px - dx * HALF_PI, 0, HALF_PI)
    return {"r": r, "omega_x": wx, "theta": theta, "d_x": dx, "omega_y": wy, "psi": psi, "d_y": dy, "dc": mean}


def fit_atoms(blocks: np.ndarray, with_dc: bool, rounds: int = 3) -> dict[str, np.ndarray]:
    """Continuous atom parameters (float64 / int arrays, one per block) for ``blocks`` (nb, B, B).

    With a DC level, the level and the atom are refined alternately (``rounds`` times): the block
    mean is only a first guess, since the atom itself has a non-zero mean.
    """
    x = blocks.astype(np.float64)
    if not with_dc:
        return _fit_once(x, np.zeros(len(x)))
    p = _fit_once(x, x.mean(axis=(1, 2)))
    for _ in range(rounds - 1):
        atom = render_atoms({**p, "dc": np.zeros(len(x))}, x.shape[1])
        p = _fit_once(x, (x - atom).mean(axis=(1, 2)))
    return p


def flat_atoms(p: dict[str, np.ndarray], level_range: float) -> dict[str, np.ndarray]:
    """A DC-only alternative to ``p``: the atom switched off (S[0](0) = 0), ``r`` sized so the DC
    level is ``level_range``·r (the largest level the layout holds)."""
    q = dict(p)
    zero = np.zeros_like(p["r"])
    q.update(r=np.abs(p["dc"]) / level_range, omega_y=zero, psi=zero, d_y=np.zeros_like(p["d_y"]))
    return q


def render_atoms(params: dict[str, np.ndarray], b: int) -> np.ndarray:
    """(nb, B, B) float64 blocks from decoded atom parameters (``dc`` is an absolute level)."""
    t = np.arange(b, dtype=np.float64)
    sy = np.stack([Geometry.angular(np.asarray(params["omega_y"])[:, None] * t + np.asarray(params["psi"])[:, None], d) for d in range(4)])
    sx = np.stack([Geometry.angular(np.asarray(params["omega_x"])[:, None] * t + np.asarray(params["theta"])[:, None], d) for d in range(4)])
    idx = np.arange(len(params["r"]))
    fy, fx = sy[params["d_y"], idx], sx[params["d_x"], idx]  # (nb, B): the derivative-cycle lookup
    return params["r"][:, None, None] * fy[:, :, None] * fx[:, None, :] + params["dc"][:, None, None]


@attrs.define(frozen=True)
class PackedCodec(Codec):
    """Base class: subclasses set ``codec_id``, ``words`` and ``with_dc`` and define the bit layout."""

    words: ClassVar[int]  # uint64 words per block
    with_dc: ClassVar[bool]
    dc_range: ClassVar[float] = 0.0  # largest |δ| the layout holds
    block: int = attrs.field(default=8, validator=block_size_validator)

    @abc.abstractmethod
    def pack(self, params: dict[str, np.ndarray]) -> np.ndarray:
        """(nb, words) uint64 codes from continuous atom parameters (quantizing them)."""

    @abc.abstractmethod
    def unpack(self, code: np.ndarray) -> dict[str, np.ndarray]:
        """Decoded atom parameters (float64, ``d_x``/``d_y`` int, ``dc`` absolute) from codes."""

    def encode(self, weight, *, calibration=None, source: str = "") -> Encoded:
        w, dtype = as_weight(weight, min_ndim=2)
        check_float16_range(w, self.codec_id)
        w2 = w.reshape(matrix_shape(w.shape))
        blocks = to_blocks(pad_blocks(w2, self.block, self.block), self.block, self.block)
        candidates = [fit_atoms(blocks, with_dc=False)]
        if self.with_dc:
            with_dc = fit_atoms(blocks, with_dc=True)
            candidates += [with_dc, flat_atoms(with_dc, self.dc_range)]
        # quantize every candidate and keep, per block, the one that reconstructs best
        codes = np.stack([self.pack(c) for c in candidates])
        errors = np.stack([((render_atoms(self.unpack(c), self.block) - blocks) ** 2).sum(axis=(1, 2)) for c in codes])
        code = codes[np.argmin(errors, axis=0), np.arange(len(blocks))]
        return Encoded(self, w.shape, {"code": code}, dtype=dtype, source=source)

    def _grid_shape(self, shape) -> tuple[int, int]:
        rows, cols = matrix_shape(shape)
        return round_up(rows, self.block) // self.block, round_up(cols, self.block) // self.block

    def torch_form(self):
        """Training form (``rbe_plugins.torch_forms``; imports torch on first use)."""
        from .torch_forms import FORMS

        return FORMS[self.codec_id]

    def validate(self, encoded: Encoded) -> None:
        if len(encoded.shape) < 2:
            raise RBEFormatError(f"{self.codec_id}: shape {list(encoded.shape)} is not 2-D or more")
        gr, gc = self._grid_shape(encoded.shape)
        check_payload(encoded, {"code": ((gr * gc, self.words), "uint64")})
        self.check_codes(encoded.payload["code"])

    def check_codes(self, code: np.ndarray) -> None:
        """Raise ``RBEFormatError`` for codes the layout cannot hold (e.g. non-finite floats)."""

    def _decode_block_rows(self, encoded: Encoded, br0: int, br1: int) -> np.ndarray:
        _, gc = self._grid_shape(encoded.shape)
        code = encoded.payload["code"][br0 * gc : br1 * gc]
        return from_blocks(render_atoms(self.unpack(code), self.block), br1 - br0, gc)

    def decode_rows(self, encoded: Encoded, start: int, stop: int) -> np.ndarray:
        return rows_from_block_rows(
            lambda br0, br1: self._decode_block_rows(encoded, br0, br1),
            start, stop, self.block, encoded.matrix_shape[1],
        )

    def decode(self, encoded: Encoded) -> np.ndarray:
        return self.decode_rows(encoded, 0, encoded.matrix_shape[0]).reshape(encoded.shape)
