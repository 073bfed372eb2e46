"""``RBETensor`` (seed 003): a logical tensor stored as a grid of encoded blocks.

The tensor's 2-D matrix view (rows = ``shape[0]``, cols = the rest, as for every codec) is cut into
blocks of ``block_shape``; edge blocks hold the remainder. Each block is an ``Encoded`` of any
registered codec, optionally flagged *transposed* (the block stores the transpose of the logical
block), which makes ``transpose()`` free and exact. Reads decode only what they touch: one row of
one block for ``get``, the covered blocks for ``rows``/``block``/unaligned ``slice``. ``matmul``
runs the backend's fused ``linear`` per block, never decoding the whole tensor.

Operations that produce new values (``set``, ``add``, ``mul``, unaligned ``slice``, ``reshape``
that changes the matrix view) decode the blocks involved and re-encode the result, with the
codec passed as ``codec=`` or, by default, the codec of the block being replaced (for ``slice``
and ``reshape``: of the first block). Re-encoding with a lossy codec adds that codec's error.
Structural operations (``transpose``, aligned ``slice``, ``concat``, ``reshape`` keeping the matrix
view) share the encoded blocks and are exact.

Files: ``save_tensors``/``load_tensors`` store each block as a container tensor ``NAME[bi,bj]``
and the layout in the user metadata under ``rbe.rbetensor`` (docs/format.md).
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from .abc import Codec, Encoded
from .arrays import as_weight, is_torch, matrix_shape
from .container import Writer
from .errors import RBEError, RBEFormatError
from .files import open as open_rbe
from .registry import get_backend, get_codec

#: User-metadata key holding the layouts of the RBETensors in a file.
LAYOUT_KEY = "rbe.rbetensor"


def _index(i, n: int, what: str) -> int:
    """``i`` as a non-negative index into ``n`` items (negative counts from the end)."""
    i = operator.index(i)
    if not -n <= i < n:
        raise IndexError(f"{what} index {i} is out of range for size {n}")
    return i + n if i < 0 else i


def _positive(_inst, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@attrs.define(frozen=True)
class BlockLayout:
    """A ``rows`` x ``cols`` matrix cut into ``block_rows`` x ``block_cols`` blocks, row-major;
    the last block row/column holds the remainder."""

    rows: int = attrs.field(validator=_positive)
    cols: int = attrs.field(validator=_positive)
    block_rows: int = attrs.field(validator=_positive)
    block_cols: int = attrs.field(validator=_positive)

    @property
    def grid(self) -> tuple[int, int]:
        return -(-self.rows // self.block_rows), -(-self.cols // self.block_cols)

    @property
    def num_blocks(self) -> int:
        return math.prod(self.grid)

    def logical_to_block(self, i: int, j: int) -> tuple[int, int, int, int]:
        """Logical (i, j) -> (block row, block col, row inside the block, col inside the block)."""
        i, j = _index(i, self.rows, "row"), _index(j, self.cols, "column")
        return i // self.block_rows, j // self.block_cols, i % self.block_rows, j % self.block_cols

    def block_to_logical(self, bi: int, bj: int) -> tuple[int, int]:
        """Logical (row, col) of the first element of block (bi, bj)."""
        gr, gc = self.grid
        return _index(bi, gr, "block row") * self.block_rows, _index(bj, gc, "block column") * self.block_cols

    def block_extent(self, bi: int, bj: int) -> tuple[int, int]:
        """(height, width) of block (bi, bj)."""
        r0, c0 = self.block_to_logical(bi, bj)
        return min(self.block_rows, self.rows - r0), min(self.block_cols, self.cols - c0)

    def block_id(self, bi: int, bj: int) -> int:
        gr, gc = self.grid
        return _index(bi, gr, "block row") * gc + _index(bj, gc, "block column")

    def block_coords(self, block_id: int) -> tuple[int, int]:
        return divmod(_index(block_id, self.num_blocks, "block"), self.grid[1])


def _resolve_codec(codec) -> Codec | None:
    """None (keep each block's codec), a ``Codec``, or an id/config for ``get_codec``."""
    if codec is None or isinstance(codec, Codec):
        return codec
    return get_codec(codec)


def _span(sl, n: int, what: str) -> tuple[int, int]:
    """(start, stop) of a step-1 slice (or None for everything) over ``n`` items."""
    if sl is None:
        return 0, n
    if not isinstance(sl, slice):
        raise TypeError(f"{what} must be a slice or None, got {type(sl).__name__}")
    start, stop, step = sl.indices(n)
    if step != 1:
        raise ValueError(f"{what} slice step must be 1, got {step}")
    if stop <= start:
        raise ValueError(f"{what} slice {sl} selects nothing from size {n}")
    return start, stop


def _cat(parts: list, axis: int):
    if is_torch(parts[0]):
        import torch

        return torch.cat(parts, dim=axis)
    return np.concatenate(parts, axis=axis)


class RBETensor:
    """A logical tensor made of encoded blocks (see the module docstring for the semantics).

    ``RBETensor(blocks, shape=None, transposed=None)``: ``blocks`` is a rectangular grid (list of
    lists) of ``Encoded`` whose matrix views tile a matrix: all blocks full size except the last
    block row/column. ``transposed`` is an optional same-shaped grid of bools (block stores the
    transpose of the logical block). ``shape`` defaults to the matrix (rows, cols); any shape with
    that matrix view is allowed. Raises ``ValueError``/``TypeError`` for anything else.
    """

    def __init__(self, blocks: Sequence[Sequence[Encoded]], shape: Sequence[int] | None = None,
                 transposed: Sequence[Sequence[bool]] | None = None):
        grid = [list(row) for row in blocks]
        if not grid or not grid[0] or any(len(row) != len(grid[0]) for row in grid):
            raise ValueError("blocks must be a non-empty rectangular grid (a list of equal-length lists)")
        flags = [[False] * len(grid[0]) for _ in grid] if transposed is None else [list(r) for r in transposed]
        if [len(r) for r in flags] != [len(r) for r in grid]:
            raise ValueError("transposed must be a grid of bools shaped like blocks")
        for bi, row in enumerate(grid):
            for bj, enc in enumerate(row):
                if not isinstance(enc, Encoded):
                    raise TypeError(f"block ({bi}, {bj}) is a {type(enc).__name__}, expected Encoded")
        self._grid = [[(enc, bool(t)) for enc, t in zip(row, trow, strict=True)] for row, trow in zip(grid, flags, strict=True)]
        heights = [self._extent(bi, 0)[0] for bi in range(len(grid))]
        widths = [self._extent(0, bj)[1] for bj in range(len(grid[0]))]
        self.layout = BlockLayout(sum(heights), sum(widths), heights[0], widths[0])
        if self.layout.grid != (len(grid), len(grid[0])):
            raise ValueError(f"block heights {heights} / widths {widths} do not form a regular layout")
        for bi in range(len(grid)):
            for bj in range(len(grid[0])):
                if self._extent(bi, bj) != self.layout.block_extent(bi, bj):
                    raise ValueError(f"block ({bi}, {bj}) is {self._extent(bi, bj)}, the layout needs "
                                     f"{self.layout.block_extent(bi, bj)}")
        mat = (self.layout.rows, self.layout.cols)
        self.shape = mat if shape is None else tuple(operator.index(d) for d in shape)
        if matrix_shape(self.shape) != mat:
            raise ValueError(f"shape {list(self.shape)} does not have the blocks' matrix view {list(mat)}")

    def _extent(self, bi: int, bj: int) -> tuple[int, int]:
        enc, t = self._grid[bi][bj]
        h, w = enc.matrix_shape
        return (w, h) if t else (h, w)

    @classmethod
    def _from_pairs(cls, pairs: list[list[tuple[Encoded, bool]]], shape=None) -> RBETensor:
        return cls([[e for e, _ in row] for row in pairs], shape, [[t for _, t in row] for row in pairs])

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def from_array(cls, array, codec, block_shape: Sequence[int] | None = None) -> RBETensor:
        """Encode a numpy array or torch tensor (>= 1-D, float) block by block with ``codec`` (an id,
        config or ``Codec``); ``block_shape`` (rows, cols) of the matrix view, None = one block."""
        codec = _resolve_codec(codec)
        if codec is None:
            raise ValueError("from_array needs a codec")
        w, _ = as_weight(array)
        rows, cols = matrix_shape(w.shape)
        w2 = w.reshape(rows, cols)
        br, bc = (rows, cols) if block_shape is None else tuple(block_shape)
        layout = BlockLayout(rows, cols, br, bc)
        blocks = []
        for bi in range(layout.grid[0]):
            blocks.append([])
            for bj in range(layout.grid[1]):
                (r0, c0), (h, wd) = layout.block_to_logical(bi, bj), layout.block_extent(bi, bj)
                blocks[-1].append(codec.encode(w2[r0:r0 + h, c0:c0 + wd]))
        return cls(blocks, w.shape)

    @classmethod
    def from_encoded(cls, encoded: Encoded) -> RBETensor:
        """A tensor of one block: ``encoded`` itself (any shape; blocks use its matrix view)."""
        return cls([[encoded]], encoded.shape)

    # ---- properties ----------------------------------------------------------------------------

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.layout.rows, self.layout.cols

    @property
    def block_shape(self) -> tuple[int, int]:
        return self.layout.block_rows, self.layout.block_cols

    @property
    def grid(self) -> tuple[int, int]:
        return self.layout.grid

    def blocks(self) -> Iterator[tuple[int, int, Encoded, bool]]:
        """Every block as (bi, bj, encoded, transposed), row-major."""
        for bi, row in enumerate(self._grid):
            for bj, (enc, t) in enumerate(row):
                yield bi, bj, enc, t

    @property
    def nbytes(self) -> int:
        """Stored bytes of all blocks (payload plus each block's container header entry)."""
        return sum(enc.nbytes for _, _, enc, _ in self.blocks())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / math.prod(self.matrix_shape)

    def __repr__(self) -> str:
        codecs = sorted({enc.codec.codec_id for _, _, enc, _ in self.blocks()})
        return f"RBETensor(shape={list(self.shape)}, block_shape={list(self.block_shape)}, grid={list(self.grid)}, codecs={codecs})"

    # ---- element access ------------------------------------------------------------------------

    def _matrix_index(self, index: tuple) -> tuple[int, int]:
        if len(index) != self.ndim:
            raise IndexError(f"expected {self.ndim} indices for shape {list(self.shape)}, got {len(index)}")
        idx = [_index(i, n, f"axis {k}") for k, (i, n) in enumerate(zip(index, self.shape, strict=True))]
        if self.ndim < 2:
            return (idx[0] if idx else 0), 0
        return idx[0], int(np.ravel_multi_index(idx[1:], self.shape[1:]))

    def get(self, *index) -> float:
        """The value at logical ``index`` (one index per dimension); decodes one row of one block."""
        bi, bj, li, lj = self.layout.logical_to_block(*self._matrix_index(index))
        enc, t = self._grid[bi][bj]
        return float(enc.decode_rows(lj, lj + 1)[0, li] if t else enc.decode_rows(li, li + 1)[0, lj])

    def set(self, *args) -> None:
        """``set(*index, value)``: write ``value`` at logical ``index``, in place. Only the block
        holding it is decoded and re-encoded (with its own codec)."""
        if not args:
            raise TypeError("set(*index, value) needs an index and a value")
        *index, value = args
        bi, bj, li, lj = self.layout.logical_to_block(*self._matrix_index(tuple(index)))
        enc, t = self._grid[bi][bj]
        stored = enc.decode().reshape(enc.matrix_shape).copy()
        stored[(lj, li) if t else (li, lj)] = value
        self._grid[bi][bj] = (enc.codec.encode(stored.reshape(enc.shape), source=enc.source), t)

    # ---- decoding ------------------------------------------------------------------------------

    def _window(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Logical matrix window [r0:r1, c0:c1] (float32), decoding only the blocks it covers."""
        lay = self.layout
        out = np.empty((r1 - r0, c1 - c0), dtype=np.float32)
        for bi in range(r0 // lay.block_rows, (r1 - 1) // lay.block_rows + 1):
            for bj in range(c0 // lay.block_cols, (c1 - 1) // lay.block_cols + 1):
                (br, bc), (h, w) = lay.block_to_logical(bi, bj), lay.block_extent(bi, bj)
                a, b = max(r0, br) - br, min(r1, br + h) - br
                c, d = max(c0, bc) - bc, min(c1, bc + w) - bc
                enc, t = self._grid[bi][bj]
                part = self._block_array(bi, bj)[a:b, c:d] if t else enc.decode_rows(a, b)[:, c:d]
                out[br + a - r0 : br + b - r0, bc + c - c0 : bc + d - c0] = part
        return out

    def _block_array(self, bi: int, bj: int) -> np.ndarray:
        enc, t = self._grid[bi][bj]
        m = enc.decode().reshape(enc.matrix_shape)
        return m.T if t else m

    def block(self, bi: int, bj: int) -> np.ndarray:
        """Decoded logical block (bi, bj), float32 2-D (only that block is decoded)."""
        gr, gc = self.grid
        return np.ascontiguousarray(self._block_array(_index(bi, gr, "block row"), _index(bj, gc, "block column")))

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the matrix view, float32 (decodes only the block rows they touch)."""
        n = self.layout.rows
        if not (isinstance(start, numbers.Integral) and isinstance(stop, numbers.Integral) and 0 <= start <= stop <= n):
            raise IndexError(f"rows({start}, {stop}) is not a range within 0..{n}")
        if start == stop:
            return np.zeros((0, self.layout.cols), dtype=np.float32)
        return self._window(int(start), int(stop), 0, self.layout.cols)

    def decode(self) -> np.ndarray:
        """The whole tensor, float32 of ``shape``."""
        return self._window(0, self.layout.rows, 0, self.layout.cols).reshape(self.shape)

    #: numpy operators defer to ours (``x @ t`` runs the fused path; ``array + t`` is a TypeError)
    __array_ufunc__ = None

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.decode() if dtype is None else self.decode().astype(dtype)

    def to_torch(self, device=None):
        """The decoded tensor as a float32 torch tensor (on ``device`` when given)."""
        import torch

        t = torch.from_numpy(self.decode())
        return t if device is None else t.to(device)

    # ---- element-wise ops ----------------------------------------------------------------------

    def _combine(self, other, op, codec) -> RBETensor:
        codec = _resolve_codec(codec)
        if isinstance(other, RBETensor):
            if other.shape != self.shape or other.layout != self.layout:
                raise ValueError(f"layouts differ: shape {list(self.shape)} blocks {list(self.block_shape)} vs "
                                 f"shape {list(other.shape)} blocks {list(other.block_shape)}")

            def operand(bi, bj):
                return other._block_array(bi, bj)
        elif isinstance(other, numbers.Real):
            scalar = np.float32(other)

            def operand(bi, bj):
                return scalar
        else:
            raise TypeError(f"expected an RBETensor with the same layout or a real scalar, got {type(other).__name__}")
        pairs = [[((codec or enc.codec).encode(op(self._block_array(bi, bj), operand(bi, bj))), False)
                  for bj, (enc, _) in enumerate(row)] for bi, row in enumerate(self._grid)]
        return self._from_pairs(pairs, self.shape)

    def add(self, other, codec=None) -> RBETensor:
        """``self + other`` (a scalar or an RBETensor of the same shape and layout), block by block;
        each result block is encoded with ``codec`` or, by default, the codec of self's block."""
        return self._combine(other, np.add, codec)

    def mul(self, other, codec=None) -> RBETensor:
        """Element-wise ``self * other``; same rules as ``add``."""
        return self._combine(other, np.multiply, codec)

    def __add__(self, other):
        return self.add(other) if isinstance(other, (RBETensor, numbers.Real)) else NotImplemented

    def __mul__(self, other):
        return self.mul(other) if isinstance(other, (RBETensor, numbers.Real)) else NotImplemented

    __radd__ = __add__
    __rmul__ = __mul__

    # ---- products ------------------------------------------------------------------------------

    def rmatmul(self, x, backend=None):
        """``x @ self`` for dense ``x`` (numpy or torch, last dimension = rows of the matrix view);
        the result is of x's kind. Each block runs through the backend's fused kernels."""
        backend = backend if backend is not None else get_backend()
        lay = self.layout
        if x.ndim < 1 or x.shape[-1] != lay.rows:
            raise ValueError(f"x's last dimension is {x.shape[-1] if x.ndim else None}, expected {lay.rows}")
        cols = []
        for bj in range(lay.grid[1]):
            acc = None
            for bi in range(lay.grid[0]):
                r0, h = lay.block_to_logical(bi, bj)[0], lay.block_extent(bi, bj)[0]
                enc, t = self._grid[bi][bj]
                # logical block B: x @ B is linear(x, E) when E = B.T is stored, else grad_input(x, E)
                part = (backend.linear if t else backend.linear_grad_input)(x[..., r0:r0 + h], enc)
                acc = part if acc is None else acc + part
            cols.append(acc)
        return _cat(cols, -1)

    def matmul(self, other, backend=None):
        """``self @ other`` for dense ``other`` (numpy or torch, 1-D of length cols or 2-D (cols, k))
        of the 2-D matrix view, computed as ``(other.T @ self.T).T`` through ``rmatmul``."""
        if other.ndim not in (1, 2):
            raise ValueError(f"matmul needs a 1-D or 2-D dense operand, got shape {list(other.shape)}")
        out = self._as_matrix().transpose().rmatmul(other if other.ndim == 1 else other.T, backend)
        return out if other.ndim == 1 else out.T

    def __matmul__(self, other):
        return NotImplemented if isinstance(other, RBETensor) else self.matmul(other)

    def __rmatmul__(self, x):
        return self.rmatmul(x)

    # ---- structure -----------------------------------------------------------------------------

    def _as_matrix(self) -> RBETensor:
        return self if self.ndim == 2 else self.reshape(self.matrix_shape)

    def transpose(self) -> RBETensor:
        """The transpose of a 2-D tensor; free and exact (blocks are shared, flagged transposed)."""
        if self.ndim != 2:
            raise ValueError(f"transpose needs a 2-D tensor, got shape {list(self.shape)}; reshape first")
        pairs = [[(enc, not t) for enc, t in col] for col in zip(*self._grid, strict=True)]
        return self._from_pairs(pairs, self.shape[::-1])

    @property
    def T(self) -> RBETensor:  # noqa: N802 - numpy/torch spelling
        return self.transpose()

    def reshape(self, *shape, codec=None, block_shape: Sequence[int] | None = None) -> RBETensor:
        """A view with ``shape`` (one entry may be -1). Free when the matrix view (rows, cols) is
        unchanged; otherwise the tensor is decoded and re-encoded with ``codec`` (default: the
        first block's) in ``block_shape`` blocks (default: the current block shape)."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        shape = tuple(operator.index(d) for d in shape)
        numel = math.prod(self.shape)
        if shape.count(-1) > 1 or any(d < -1 for d in shape):
            raise ValueError(f"invalid shape {list(shape)}")
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            if known == 0 or numel % known:
                raise ValueError(f"cannot reshape {list(self.shape)} into {list(shape)}")
            shape = tuple(numel // known if d == -1 else d for d in shape)
        if math.prod(shape) != numel:
            raise ValueError(f"cannot reshape {list(self.shape)} ({numel} values) into {list(shape)}")
        if matrix_shape(shape) == self.matrix_shape:
            return self._from_pairs(self._grid, shape)
        return RBETensor.from_array(self.decode().reshape(shape), codec or self._grid[0][0][0].codec,
                                    block_shape or self.block_shape)

    def slice(self, rows: slice | None = None, cols: slice | None = None, *, codec=None) -> RBETensor:
        """The 2-D window ``[rows, cols]`` of the matrix view (step-1 slices, None = all).

        Block-aligned windows (starting on a block boundary, ending on one or at the edge) share
        the blocks; others decode the covered blocks and re-encode the window with ``codec``
        (default: the first covered block's codec) in blocks of the same shape.
        """
        lay = self.layout
        r0, r1 = _span(rows, lay.rows, "rows")
        c0, c1 = _span(cols, lay.cols, "cols")
        aligned = (r0 % lay.block_rows == 0 and (r1 % lay.block_rows == 0 or r1 == lay.rows)
                   and c0 % lay.block_cols == 0 and (c1 % lay.block_cols == 0 or c1 == lay.cols))
        bi0, bj0 = r0 // lay.block_rows, c0 // lay.block_cols
        if aligned:
            bi1, bj1 = -(-r1 // lay.block_rows), -(-c1 // lay.block_cols)
            return self._from_pairs([row[bj0:bj1] for row in self._grid[bi0:bi1]])
        return RBETensor.from_array(self._window(r0, r1, c0, c1), codec or self._grid[bi0][bj0][0].codec,
                                    self.block_shape)

    @staticmethod
    def concat(tensors: Sequence[RBETensor], axis: int = 0) -> RBETensor:
        """Join tensors along ``axis`` (0: rows, keeping trailing dims; 1: columns of 2-D tensors),
        sharing their blocks. All must have the same block shape, except that the last may be a
        single shorter block along ``axis``; every tensor but the last must fill whole blocks along
        ``axis`` so the result keeps a regular layout."""
        tensors = list(tensors)
        if not tensors or not all(isinstance(t, RBETensor) for t in tensors):
            raise TypeError("concat needs a non-empty sequence of RBETensor")
        if axis not in (0, 1):
            raise ValueError(f"axis must be 0 or 1, got {axis}")
        first = tensors[0]
        if axis == 1 and any(t.ndim != 2 for t in tensors):
            raise ValueError("concat along axis 1 needs 2-D tensors")
        off = 1 - axis
        for t in tensors[1:]:
            short_tail = t is tensors[-1] and t.grid[axis] == 1 and t.block_shape[axis] <= first.block_shape[axis]
            if t.block_shape[off] != first.block_shape[off] or (t.block_shape[axis] != first.block_shape[axis]
                                                                and not short_tail):
                raise ValueError(f"block shapes differ: {list(first.block_shape)} vs {list(t.block_shape)}")
            if t.shape[:axis] + t.shape[axis + 1:] != first.shape[:axis] + first.shape[axis + 1:]:
                raise ValueError(f"shapes {list(first.shape)} and {list(t.shape)} differ off axis {axis}")
        step = first.block_shape[axis]
        for t in tensors[:-1]:
            if t.matrix_shape[axis] % step or t.block_shape[axis] != step:
                raise ValueError(f"a tensor of {t.matrix_shape[axis]} along axis {axis} does not fill whole "
                                 f"blocks of {step}; only the last tensor may end in a partial block")
        if axis == 0:
            pairs = [row for t in tensors for row in t._grid]
            shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
        else:
            pairs = [sum((t._grid[bi] for t in tensors), []) for bi in range(first.grid[0])]
            shape = (first.shape[0], sum(t.shape[1] for t in tensors))
        return RBETensor._from_pairs(pairs, shape)

    # ---- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, name: str = "tensor", metadata: Mapping[str, Any] | None = None) -> Path:
        """Write this tensor alone to an .rbe file (see ``save_tensors``)."""
        return save_tensors(path, {name: self}, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> RBETensor:
        """The RBETensor ``name`` from an .rbe file (``name`` may be omitted when there is one)."""
        tensors = load_tensors(path)
        if name is None:
            if len(tensors) != 1:
                raise ValueError(f"{path} holds {len(tensors)} RBETensors ({sorted(tensors)}); pass name=")
            return next(iter(tensors.values()))
        if name not in tensors:
            raise KeyError(f"{path} holds no RBETensor {name!r} (it has {sorted(tensors)})")
        return tensors[name]


def block_name(name: str, bi: int, bj: int) -> str:
    """Container tensor name of block (bi, bj) of RBETensor ``name``."""
    return f"{name}[{bi},{bj}]"


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, RBETensor],
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Write RBETensors to an .rbe file atomically (streamed through ``container.Writer``).

    Block (bi, bj) of ``NAME`` is stored as container tensor ``NAME[bi,bj]``; the layouts go into
    the user metadata under ``rbe.rbetensor`` (the rest of ``metadata`` is kept as given).
    """
    meta = dict(metadata or {})
    if LAYOUT_KEY in meta:
        raise ValueError(f"metadata key {LAYOUT_KEY!r} is reserved for RBETensor layouts")
    layouts = {}
    with Writer(path) as writer:
        for name, t in tensors.items():
            if not isinstance(t, RBETensor):
                raise TypeError(f"{name!r}: expected an RBETensor, got {type(t).__name__}")
            for bi, bj, enc, _ in t.blocks():
                writer.add(block_name(name, bi, bj), enc)
            layouts[name] = {"shape": list(t.shape), "block_shape": list(t.block_shape), "grid": list(t.grid),
                             "transposed": [[bi, bj] for bi, bj, _, tr in t.blocks() if tr]}
        return writer.close({**meta, LAYOUT_KEY: layouts})


def load_tensors(path: str | os.PathLike) -> dict[str, RBETensor]:
    """Every RBETensor stored in an .rbe file by ``save_tensors``; ``RBEFormatError`` when the
    layout is missing or inconsistent with the stored blocks."""
    f = open_rbe(path)
    layouts = f.metadata.get(LAYOUT_KEY)
    if not isinstance(layouts, dict):
        raise RBEFormatError(f"{path}: holds no RBETensor layout (metadata {LAYOUT_KEY!r})")
    out = {}
    for name, lay in layouts.items():
        try:
            (gr, gc), flags = lay["grid"], {tuple(p) for p in lay["transposed"]}
            blocks = [[f[block_name(name, bi, bj)] for bj in range(gc)] for bi in range(gr)]
            t = RBETensor(blocks, lay["shape"], [[(bi, bj) in flags for bj in range(gc)] for bi in range(gr)])
        except RBEError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise RBEFormatError(f"{path}: RBETensor {name!r}: bad layout or missing block: {exc}") from exc
        if list(t.block_shape) != list(lay["block_shape"]):
            raise RBEFormatError(f"{path}: RBETensor {name!r}: blocks are {list(t.block_shape)}, "
                                 f"layout says {lay['block_shape']}")
        out[name] = t
    return out
