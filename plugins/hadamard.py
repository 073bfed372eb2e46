"""``hadamard``: randomized Hadamard rotation + group-wise scales + GPTQ rounding.

The flagship codec for trained weights (DESIGN.md §4). A weight viewed as (rows, cols) is
encoded row by row along the input dimension (cols):

1. **Rotation.** Each row is zero-padded to ``cols_p`` (``cols`` rounded up to a multiple of
   ``group_size``), multiplied by a pseudo-random ±1 sign vector (splitmix64 of ``seed``), and
   transformed by a block-diagonal Walsh–Hadamard matrix whose blocks are the binary expansion of
   ``cols_p`` (largest power of two first, each at most ``max_block``; 576 → 512 + 64), scaled
   to be orthonormal. ``R = blockdiag(H_b / sqrt(b)) · diag(signs)`` is orthogonal, so
   ``W = W_rot · R`` and ``x @ W.T == (x @ R.T) @ W_rot.T``.
2. **Scales.** In the rotated basis, every group of ``group_size`` consecutive columns of a row
   has one step ``s = row_scale[row] * scale_code[row, group]`` (``scale_code`` uint8, 0..255,
   ``row_scale`` float32). The step is chosen per group by a clipping search minimising the
   group's squared rounding error.
3. **Codes.** ``bits``-bit unsigned codes ``q`` index a symmetric grid of ``2**bits`` levels:
   ``w_rot ≈ levels[q] * s``. ``grid="uniform"`` is the mid-rise grid ``levels[q] = q - (2**bits
   - 1) / 2``; ``grid="normal"`` is the Lloyd–Max quantizer of the standard normal distribution
   (:func:`normal_levels`), which the rotated weights follow closely: at 4 bits on
   all-MiniLM-L6-v2, every matrix calibrated, ``1 − cos`` 0.0168 → 0.0130 (docs/quality.md).
   With ``calibration`` activations X (n, cols) the codes
   are chosen by GPTQ (Frantar et al. 2022) with Hessian ``H = X_rotᵀ X_rot / n`` (+ ``damp`` ×
   mean diagonal), columns in descending-Hessian-diagonal order when ``act_order``, processed in
   blocks of 128 with lazy batch updates: this minimises the layer *output* error ‖XWᵀ − XŴᵀ‖
   rather than the weight error. Without calibration, codes are round-to-nearest in the rotated
   basis (still better than plain RTN on weights with outliers, never better than GPTQ).

Payload: ``codes`` uint8[rows, ceil(cols_p * bits / 8)] (each row a little-endian bit stream of
``cols_p`` codes) or, 4-bit codes with ``cols_p`` a multiple of 32 (written so since 2026-12-06;
older files hold ``codes`` and read alike), ``nibbles`` uint8[rows, cols_p / 2]: per 32 columns
16 bytes, byte t = code t | code t + 16 << 4, the packing the native engine computes with, so it
reads them in place from the mapped file (``rbe_core.native.lowering.pack_nibble_blocks``);
``scale_code`` uint8[rows, cols_p / group_size], ``row_scale`` float32[rows].
Bits per weight ≈ bits + 8/group_size + 32/cols (+ header): 4.19 for 4-bit, group 64, 576 cols.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import attrs
import numpy as np

from rbe_core import Codec, Encoded, hookimpl
from rbe_core.abc import check_payload
from rbe_core.arrays import as_weight, matrix_shape, row_chunks, to_numpy_f32
from rbe_core.compression.gptq import gptq_sweep, hessian_factor, transformed_hessian
from rbe_core.errors import InvalidWeightError, RBEFormatError
from rbe_core.native.lowering import HadamardTransform, Lowered

from ._blocks import four_bit_lowered
from ._hadamard_codes import code_field, code_payload, payload_codes, unpack_codes

_SCALE_LEVELS = 255
#: Weights encoded at a time by round-to-nearest (rows are independent): the float64 rotation of
#: a chunk stays in the L2 cache; a whole 8B-shape matrix at once took several GB of temporaries.
RTN_CHUNK_ELEMENTS = 1 << 18


def _pow2(name: str):
    def check(_inst, _attr, value):
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < 1
            or value & (value - 1)
        ):
            raise ValueError(f"{name} must be a positive power of two, got {value!r}")

    return check


def _bits_ok(_inst, _attr, value):
    if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {value!r}")


def _seed_ok(_inst, _attr, value):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {value!r}")


def _damp_ok(_inst, _attr, value):
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 10:
        raise ValueError(f"damp must be a number in (0, 10), got {value!r}")


def _bool_ok(_inst, _attr, value):
    if not isinstance(value, bool):
        raise ValueError(f"act_order must be a bool, got {value!r}")


def _grid_ok(_inst, _attr, value):
    if value not in GRIDS:
        raise ValueError(f"grid must be one of {sorted(GRIDS)}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# rotation


def padded_cols(cols: int, group_size: int) -> int:
    """``cols`` rounded up to a multiple of ``group_size``."""
    return -(-cols // group_size) * group_size


def hadamard_blocks(cols_p: int, max_block: int) -> list[int]:
    """Block sizes of the block-diagonal Hadamard: the binary expansion of ``cols_p``, capped."""
    blocks, rest = [], cols_p
    while rest:
        b = min(1 << (rest.bit_length() - 1), max_block)
        blocks.append(b)
        rest -= b
    return blocks


def sign_vector(n: int, seed: int) -> np.ndarray:
    """±1 float32[n]: the top bit of splitmix64(seed + i + 1). Stable across numpy versions."""
    with np.errstate(over="ignore"):
        z = np.arange(1, n + 1, dtype=np.uint64) + np.uint64(seed)
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return np.where(z >> np.uint64(63), np.float32(-1.0), np.float32(1.0))


def rotate(x: np.ndarray, signs: np.ndarray, blocks: list[int]) -> np.ndarray:
    """Rows of ``x`` (…, cols_p) times ``Rᵀ``: the forward rotation of weights and activations
    (``R``: the lowered layout's ``HadamardTransform``)."""
    return HadamardTransform(signs, tuple(blocks)).rotate(x)


def unrotate(x: np.ndarray, signs: np.ndarray, blocks: list[int]) -> np.ndarray:
    """Rows of ``x`` times ``R``: the inverse of :func:`rotate`."""
    return HadamardTransform(signs, tuple(blocks)).unrotate(x)


# ---------------------------------------------------------------------------------------------
# grids: the values the codes stand for


def normal_levels(n: int) -> np.ndarray:
    """The ``n``-level Lloyd–Max quantizer of the standard normal distribution (float64, ascending).

    Lloyd's iterations (each level moves to the conditional mean of its cell, cells bounded by
    midpoints) from the √3-compander start ``√3 Φ⁻¹((k + ½) / n)``, made exactly symmetric every
    step, until no level moves by more than 1e-12 or after 2000 iterations: converged up to 5 bits;
    at 6–8 bits the iterations stop early (levels up to 0.008 off), with a mean squared error within
    0.01% of the optimum. Pure Python floats (``statistics.NormalDist``): the same on every platform.
    On a unit normal source the best uniform grid has 1.21× (4 bits) to 2.1× (8 bits) its squared error.
    """
    from statistics import NormalDist

    dist = NormalDist()
    pts = [math.sqrt(3.0) * dist.inv_cdf((k + 0.5) / n) for k in range(n)]
    for _ in range(2000):
        edges = [(a + b) / 2 for a, b in zip(pts[:-1], pts[1:], strict=True)]
        pdf = [0.0] + [dist.pdf(e) for e in edges] + [0.0]
        cdf = [0.0] + [dist.cdf(e) for e in edges] + [1.0]
        new = [(pdf[k] - pdf[k + 1]) / (cdf[k + 1] - cdf[k]) for k in range(n)]
        new = [(a - b) / 2 for a, b in zip(new, reversed(new), strict=True)]
        moved = max(abs(a - b) for a, b in zip(new, pts, strict=True))
        pts = new
        if moved < 1e-12:
            break
    return np.asarray(pts, dtype=np.float64)


@attrs.frozen(eq=False)
class Grid:
    """The ``2**bits`` values codes stand for (``levels`` float32, ascending; ``w_rot ≈ levels[q] * step``)."""

    levels: np.ndarray
    uniform: bool
    #: shrink factors of ``max|w| / top`` the step search tries
    clip: np.ndarray
    #: cell boundaries (midpoints between levels), then +inf
    _edges: np.ndarray = attrs.field(init=False)
    #: non-uniform lookup: buckets of width 1 / _inv narrower than any cell, from _origin; the code
    #: of each bucket's start
    _origin: float = attrs.field(init=False)
    _inv: float = attrs.field(init=False)
    _bucket_codes: np.ndarray = attrs.field(init=False)

    def __attrs_post_init__(self):
        lv = self.levels.astype(np.float64)
        edges = (lv[1:] + lv[:-1]) / 2
        width = float(np.diff(edges).min()) / 2 if len(edges) > 1 else 1.0
        origin = float(edges[0]) - width
        starts = origin + width * np.arange(int(np.ceil((edges[-1] - origin) / width)) + 1)
        object.__setattr__(self, "_edges", np.append(edges, np.inf))
        object.__setattr__(self, "_origin", origin)
        object.__setattr__(self, "_inv", 1.0 / width)
        object.__setattr__(self, "_bucket_codes", np.searchsorted(edges, starts).astype(np.uint8))

    @property
    def top(self) -> float:
        """The largest level (clipping searches scale it to a group's largest weight)."""
        return float(self.levels[-1])

    def nearest(self, u: np.ndarray) -> np.ndarray:
        """uint8 codes of the levels nearest to ``u`` (values in units of the step); ties go to the
        lower level, except on uniform grids, which round half to even."""
        n = len(self.levels)
        if self.uniform:
            return np.clip(np.rint(u + (n - 1) / 2.0), 0, n - 1).astype(np.uint8)
        # the bucket's start code, plus one when the single edge a bucket can hold lies below u
        t = u.dtype.type
        b = np.subtract(u, t(self._origin))
        b *= t(self._inv)
        np.clip(b, 0, len(self._bucket_codes) - 1, out=b)
        c = self._bucket_codes.take(b.astype(np.int32))
        c += self._edges.astype(u.dtype).take(c) < u
        return c


@functools.cache
def grid_for(bits: int, kind: str) -> Grid:
    """The :class:`Grid` of ``bits``-bit codes of grid ``kind`` (one of ``GRIDS``)."""
    if kind == "uniform":
        levels = np.arange(2**bits, dtype=np.float32) - np.float32((2**bits - 1) / 2.0)
        return Grid(levels, True, np.linspace(0.55, 1.0, 19))
    if kind == "normal":
        # the best shrink of max|w| / top for groups of 64 rotated weights moves with the bits
        # (measured on all-MiniLM-L6-v2: 0.4–0.8 at 2 bits ... 0.93–1.2+ at 5–6 bits)
        lo, hi = {2: (0.35, 0.85), 3: (0.6, 1.1), 4: (0.8, 1.2)}.get(bits, (0.85, 1.35))
        return Grid(normal_levels(2**bits).astype(np.float32), False, np.linspace(lo, hi, 17))
    raise ValueError(f"grid must be one of {sorted(GRIDS)}, got {kind!r}")


GRIDS = frozenset({"uniform", "normal"})

# ---------------------------------------------------------------------------------------------
# scales and rounding


def choose_steps(wr: np.ndarray, group_size: int, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Per-group steps for rotated weights ``wr`` (rows, cols_p): (row_scale f32, scale_code u8).

    Each group's step is ``shrink * max|w| / grid.top`` with the shrink factor from ``grid.clip``
    that minimises the group's squared round-to-nearest error; the step is then quantized to 8
    bits relative to the row's largest step.
    """
    rows, cols_p = wr.shape
    levels = grid.levels
    g = wr.reshape(rows, cols_p // group_size, group_size).astype(np.float32)
    amax = np.abs(g).max(axis=2)
    best_err = np.full(amax.shape, np.inf, dtype=np.float32)
    best = amax / np.float32(grid.top)
    u = np.empty_like(g)
    for shrink in grid.clip:  # in place where it can be: this loop is most of an RTN encode
        step = (amax * np.float32(shrink / grid.top))[:, :, None]
        np.divide(g, np.where(step > 0, step, np.float32(1.0)), out=u)
        r = levels.take(grid.nearest(u))
        r *= step
        r -= g
        np.square(r, out=r)
        err = r.sum(axis=2)
        better = err < best_err
        np.copyto(best_err, err, where=better)
        np.copyto(best, step[:, :, 0], where=better)
    return factor_steps(best)


def factor_steps(step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group steps (rows, groups) as stored: (row_scale f32, scale_code u8), 8 bits relative to
    the row's largest step (a positive step never becomes 0; negative ones become 0)."""
    step = np.asarray(step, dtype=np.float32)
    row_scale = (np.maximum(step.max(axis=1), 0) / _SCALE_LEVELS).astype(np.float32)
    safe_row = np.where(row_scale > 0, row_scale, np.float32(1.0))
    code = np.clip(np.rint(step / safe_row[:, None]), 0, _SCALE_LEVELS)
    return row_scale, np.where((step > 0) & (code == 0), 1, code).astype(np.uint8)


def group_steps(row_scale: np.ndarray, scale_code: np.ndarray) -> np.ndarray:
    """The float32 step of each group, exactly as decode computes it."""
    return row_scale[:, None] * scale_code.astype(np.float32)


def round_nearest(wr: np.ndarray, steps: np.ndarray, grid: Grid) -> np.ndarray:
    """Round-to-nearest codes (uint8) for ``wr`` with per-element ``steps`` (same shape)."""
    return grid.nearest(wr / np.where(steps > 0, steps, 1.0))


def hessian(
    x: np.ndarray, cols: int, cols_p: int, signs: np.ndarray, blocks: list[int]
) -> np.ndarray:
    """``X_rotᵀ X_rot / n`` (float64, cols_p²) of activations ``x`` (…, cols) in the rotated basis."""
    x = to_numpy_f32(x)
    if x.ndim < 1 or x.shape[-1] != cols:
        raise InvalidWeightError(
            f"calibration must have last dimension {cols}, got shape {x.shape}"
        )
    x = x.reshape(-1, cols)
    if x.shape[0] == 0:
        raise InvalidWeightError("calibration activations are empty")
    if not np.isfinite(x).all():
        raise InvalidWeightError("calibration activations contain NaN/inf")
    h = np.zeros((cols_p, cols_p), dtype=np.float64)
    for start in range(0, x.shape[0], 4096):
        chunk = np.zeros((min(4096, x.shape[0] - start), cols_p), dtype=np.float32)
        chunk[:, :cols] = x[start : start + 4096]
        xr = rotate(chunk, signs, blocks).astype(np.float64)
        h += xr.T @ xr
    return h / x.shape[0]


def rotated_hessian(gram, cols: int, cols_p: int, signs: np.ndarray, blocks: list[int]) -> np.ndarray:
    """``R H Rᵀ`` (float64, cols_p²) of a :class:`rbe_core.compression.calibration.Gram` (un-rotated ``XᵀX``)."""
    return transformed_hessian(gram, cols, cols_p, HadamardTransform(signs, tuple(blocks)))


# ---------------------------------------------------------------------------------------------
# the codec


@attrs.define(frozen=True)
class RotatedCodec(Codec):
    """What the codecs on this rotation share (``hadamard`` here, ``trellis``): the rotation and
    its padding, 8-bit group steps (``row_scale × scale_code``), the dampening of calibrated
    Hessians, and encode/decode in row chunks around a subclass's ``_encode_rows(w,
    calibration)`` (the payload of some rows), ``_values(encoded, start, stop)`` (rows in the
    rotated basis) and ``_code_field(payload, rows, cols_p)`` (the payload's codes field:
    {name: (shape, dtype)})."""

    #: ``encode`` uses calibration (activations or a ``Gram``): conversion passes it layer by layer.
    accepts_calibration = True

    group_size: int = attrs.field(default=64, validator=_pow2("group_size"))
    max_block: int = attrs.field(default=4096, validator=_pow2("max_block"))
    seed: int = attrs.field(default=0, validator=_seed_ok)
    #: 0.1, measured end to end (flagship 4.25 bpw): all-MiniLM-L6-v2 mean cosine 0.9925 at 0.01,
    #: 0.9927 at 0.05, 0.9929 at 0.1 and 0.2, 0.9927 at 0.3, 0.9925 at 0.5, 0.9916 at 1.0; SmolLM2
    #: KL 0.110 at 0.01, 0.100 at 0.1, 0.097 at 0.3. Stronger damping generalizes better beyond the
    #: calibration text.
    damp: float = attrs.field(default=0.1, validator=_damp_ok)

    def __attrs_post_init__(self):
        if self.max_block < self.group_size:
            raise ValueError(
                f"max_block ({self.max_block}) must be >= group_size ({self.group_size})"
            )

    def layout(self, cols: int) -> tuple[int, np.ndarray, list[int]]:
        """(cols_p, signs, hadamard block sizes) for a weight with ``cols`` input features."""
        cols_p = padded_cols(cols, self.group_size)
        return cols_p, sign_vector(cols_p, self.seed), hadamard_blocks(cols_p, self.max_block)

    def encode(self, weight, *, calibration=None, source: str = "") -> Encoded:
        """Encode; ``calibration`` — activations (…, cols) or a ``Gram`` — switches round-to-nearest
        to the codec's calibrated rounding."""
        w, dtype = as_weight(weight)
        rows, cols = matrix_shape(w.shape)
        flat = w.reshape(rows, cols)
        if calibration is None:  # rows are independent: in chunks that stay in cache, bounded memory
            parts = [self._encode_rows(flat[a:b], None) for a, b in row_chunks(rows, cols, RTN_CHUNK_ELEMENTS)]
            payload = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        else:
            payload = self._encode_rows(flat, calibration)
        return Encoded(self, w.shape, payload, dtype=dtype, source=source)

    @staticmethod
    def _rotated(w: np.ndarray, cols_p: int, signs: np.ndarray, blocks: list[int]) -> np.ndarray:
        """Rows ``w`` (rows, cols) zero-padded to ``cols_p`` and rotated, float64."""
        wp = np.zeros((w.shape[0], cols_p), dtype=np.float64)
        wp[:, : w.shape[1]] = w
        return rotate(wp, signs, blocks)

    def _hessian(self, calibration, cols: int, cols_p: int, signs: np.ndarray, blocks: list[int]) -> np.ndarray:
        """The rotated Hessian of ``calibration``: activations or a ``Gram``."""
        # Gram lives in the calibrated-conversion module: loaded only when calibrating
        from rbe_core.compression.calibration import Gram

        if isinstance(calibration, Gram):
            return rotated_hessian(calibration, cols, cols_p, signs, blocks)
        return hessian(calibration, cols, cols_p, signs, blocks)

    def validate(self, encoded: Encoded) -> None:
        rows, cols = matrix_shape(encoded.shape)
        cols_p = padded_cols(cols, self.group_size)
        check_payload(
            encoded,
            {
                **self._code_field(encoded.payload, rows, cols_p),
                "scale_code": ((rows, cols_p // self.group_size), "uint8"),
                "row_scale": ((rows,), "float32"),
            },
        )
        rs = encoded.payload["row_scale"]
        if not np.isfinite(rs).all() or (rs < 0).any():
            raise RBEFormatError(f"{self.codec_id}: row_scale must be finite and non-negative")

    def _steps(self, encoded: Encoded, start: int, stop: int) -> np.ndarray:
        """The float32 step of every column of rows ``start:stop`` (cols_p wide), as decode computes it."""
        p = encoded.payload
        return np.repeat(group_steps(p["row_scale"][start:stop], p["scale_code"][start:stop]), self.group_size, axis=1)

    def decode_rows(self, encoded: Encoded, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``: their values in the rotated basis, then one inverse rotation."""
        rows, cols = encoded.matrix_shape
        start, stop, _ = slice(start, stop).indices(rows)
        cols_p, signs, blocks = self.layout(cols)
        values = self._values(encoded, start, max(start, stop))
        return np.ascontiguousarray(unrotate(values, signs, blocks)[:, :cols])

    def decode(self, encoded: Encoded) -> np.ndarray:
        """All rows, decoded in row chunks that stay in cache (the same values as one
        :meth:`decode_rows` call, ~2× faster on matrices larger than the cache)."""
        rows, cols = encoded.matrix_shape
        out = np.empty((rows, cols), dtype=np.float32)
        for a, b in row_chunks(rows, padded_cols(cols, self.group_size), RTN_CHUNK_ELEMENTS):
            out[a:b] = self.decode_rows(encoded, a, b)
        return out.reshape(encoded.shape)

    def rotate_input(self, x: np.ndarray, cols: int) -> np.ndarray:
        """Activations (n, cols) in the rotated, padded basis: ``x @ W.T == rotate_input(x) @ W_rot.T``."""
        cols_p, signs, blocks = self.layout(cols)
        xp = np.zeros((x.shape[0], cols_p), dtype=np.float32)
        xp[:, :cols] = x
        return rotate(xp, signs, blocks)


@attrs.define(frozen=True)
class HadamardCodec(RotatedCodec):
    """Randomized-Hadamard rotation, 8-bit group scales, GPTQ (or RTN) ``bits``-bit codes."""

    codec_id = "hadamard"

    bits: int = attrs.field(default=4, validator=_bits_ok)
    act_order: bool = attrs.field(default=True, validator=_bool_ok)
    grid: str = attrs.field(default="uniform", validator=_grid_ok)

    def levels(self) -> np.ndarray:
        """float32[2**bits]: the value of each code in units of its group's step."""
        return grid_for(self.bits, self.grid).levels

    def _code_field(self, payload, rows: int, cols_p: int) -> dict[str, tuple]:
        return code_field(payload, rows, cols_p, self.bits)

    def _encode_rows(self, w: np.ndarray, calibration) -> dict[str, np.ndarray]:
        """The payload of the rows ``w`` (rows, cols): RTN, or GPTQ with ``calibration``, whose
        Hessian side (rotation, inverse Cholesky factor) runs on a thread beside the step search."""
        cols_p, signs, blocks = self.layout(w.shape[1])
        if calibration is None:
            wr, grid, steps, fields = self._choose_steps(w, cols_p, signs, blocks)
            return {**code_payload(round_nearest(wr, steps, grid), self.bits), **fields}
        with ThreadPoolExecutor(1) as pool:
            factor = pool.submit(self._hessian_factor, calibration, w.shape[1], cols_p, signs, blocks)
            wr, grid, steps, fields = self._chunked_steps(w, cols_p, signs, blocks)
            q = gptq_sweep(wr, steps, factor.result(), grid.levels, grid.nearest)
        return {**code_payload(q, self.bits), **fields}

    def _chunked_steps(self, w: np.ndarray, cols_p: int, signs: np.ndarray, blocks: list[int]):
        """:meth:`_choose_steps` of all rows ``w``, computed in row chunks that stay in cache (rows are
        independent: the same result as one call, ~2× faster on matrices larger than the cache)."""
        rows = w.shape[0]
        wr = np.empty((rows, cols_p), dtype=np.float64)
        steps = np.empty((rows, cols_p), dtype=np.float32)
        fields: dict[str, list[np.ndarray]] = {}
        for a, b in row_chunks(rows, cols_p, RTN_CHUNK_ELEMENTS):
            wr[a:b], grid, steps[a:b], part = self._choose_steps(w[a:b], cols_p, signs, blocks)
            for k, v in part.items():
                fields.setdefault(k, []).append(v)
        return wr, grid, steps, {k: np.concatenate(v) for k, v in fields.items()}

    def _choose_steps(self, w: np.ndarray, cols_p: int, signs: np.ndarray, blocks: list[int]):
        """(rotated weights, grid, per-element steps, the payload's step fields) of the rows ``w``."""
        wr = self._rotated(w, cols_p, signs, blocks)
        grid = grid_for(self.bits, self.grid)
        row_scale, scale_code = choose_steps(wr, self.group_size, grid)
        steps = np.repeat(group_steps(row_scale, scale_code), self.group_size, axis=1)
        return wr, grid, steps, {"scale_code": scale_code, "row_scale": row_scale}

    def _hessian_factor(self, calibration, cols: int, cols_p: int, signs: np.ndarray, blocks: list[int]):
        """GPTQ's factor of the rotated Hessian of ``calibration``: activations or a ``Gram``."""
        return hessian_factor(self._hessian(calibration, cols, cols_p, signs, blocks), float(self.damp), self.act_order)

    def _values(self, encoded: Encoded, start: int, stop: int) -> np.ndarray:
        cols_p = padded_cols(encoded.matrix_shape[1], self.group_size)
        q = payload_codes(encoded.payload, cols_p, self.bits, start, stop)
        return self.levels()[q] * self._steps(encoded, start, stop)

    def lower(self, encoded: Encoded) -> Lowered:
        """The canonical layout (``rbe_core.native.lowering``): codes (stored nibbles as they are),
        this grid's levels, the group steps ``row_scale * scale_code`` and the rotation as the
        input transform."""
        rows, cols = encoded.matrix_shape
        cols_p, signs, blocks = self.layout(cols)
        p = encoded.payload
        return Lowered(
            rows, cols, self.bits, self.group_size,
            **four_bit_lowered(p, "codes", lambda v: unpack_codes(v, cols_p, self.bits)),
            levels=self.levels(), step=group_steps(p["row_scale"], p["scale_code"]),
            transform=HadamardTransform(signs.astype(np.float32), tuple(blocks)),
            step_row=p["row_scale"], step_code=p["scale_code"],
        )

    def bit_settings(self) -> list[HadamardCodec]:
        """This codec at 8, 6, 5, 4, 3 and 2 bits (its grid, groups and rotation kept)."""
        return [attrs.evolve(self, bits=b) for b in (8, 6, 5, 4, 3, 2)]

    #: training moves the group steps (stored again as row scale × 8-bit code); the grid is fixed
    trainable_lowered = ("step",)

    def from_lowered(self, encoded: Encoded, lowered: Lowered) -> Encoded:
        """The inverse of :meth:`lower`: codes packed again, steps factored into row scale × code."""
        rows, cols = encoded.matrix_shape
        cols_p = self.layout(cols)[0]
        if (lowered.bits, lowered.group_size, lowered.rows, lowered.cols, lowered.cols_p) != (
                self.bits, self.group_size, rows, cols, cols_p) or lowered.offset is not None:
            raise ValueError("hadamard: the lowered layout does not match this codec and shape")
        if not np.array_equal(lowered.levels, self.levels()) or int(lowered.codes.max(initial=0)) >= 2**self.bits:
            raise ValueError("hadamard: the level table is fixed and codes must be below 2**bits")
        if lowered.step_row is not None:
            row_scale, scale_code = lowered.step_row, lowered.step_code
        else:
            row_scale, scale_code = factor_steps(lowered.step)
        codes = {"nibbles": lowered.nibbles} if lowered.nibbles is not None else code_payload(lowered.codes, self.bits)
        payload = {**codes, "scale_code": scale_code, "row_scale": row_scale}
        return Encoded(self, encoded.shape, payload, dtype=encoded.dtype, source=encoded.source)

    def torch_form(self):
        """Training form (``rbe_plugins.torch_forms_hadamard``; imports torch on first use)."""
        from .torch_forms_hadamard import FORM

        return FORM


@hookimpl
def rbe_register_codecs(register):
    register(HadamardCodec)
