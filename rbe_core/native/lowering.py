"""Canonical weight layouts: the few forms native kernels run, and the codecs' *lowering* to them.

A codec that implements ``Codec.lower(encoded)`` returns a :class:`Lowered` view of a tensor,
viewed as the (rows, cols) matrix ``Encoded.matrix_shape``, that is **exactly** its decode:

- ``bits`` 2..8 (coded): ``W_c[r, c] = levels[codes[r, c]] * step[r, c // group_size]``
  (``+ offset[r, c // group_size]`` when there is an offset), a float32 multiply then a float32
  add, for ``c < cols_p`` (``cols_p >= cols``; the extra columns are padding);
- ``bits`` 32 (dense): ``W_c = dense`` (float32, rows x cols_p);
- then ``W = (W_c @ T)[:, :cols]`` with the optional input transform ``T`` (a
  :class:`HadamardTransform`: ``T = blockdiag(H_b / sqrt(b)) diag(signs)``), else
  ``W = W_c[:, :cols]``.

So ``x @ W.T == T(pad(x)) @ W_c.T``: a kernel rotates each input once and multiplies by the
codes through a level table. Optional hints let kernels store a coded matrix more compactly
without changing its values: ``step_row``/``step_code`` (the steps as a row scale times an 8-bit
code) and ``trellis_bits`` (8-bit codes that overlap like the windows of a bit-shift trellis,
storable as a stream of that many bits a weight). Codes of at most 4 bits may come as ``nibbles``
instead: already packed the way the native engine stores them (:func:`pack_nibble_blocks`), so a
codec that stores that packing in its payload lets the engine read a mapped file in place. :meth:`Lowered.decode` is the numpy reference (bit-identical to
the codec's ``decode``, which the test suite checks for every built-in codec). Lowering is done
once per tensor at load time and cached; the arrays are views or compact copies of the payload.
"""

from __future__ import annotations

import functools
import weakref

import attrs
import numpy as np

from ..arrays import row_chunks


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalised Walsh–Hadamard transform (Sylvester order) along the last axis (a power of 2).

    Butterfly stages two at a time (spans ``h`` and ``2h`` over groups of four ``h``-wide parts:
    the same additions on the same operands as one stage at a time, so bit for bit the same, with
    half the memory passes: 1.5–1.9× faster), then a last single stage when ``log2(n)`` is odd."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    rows, h = y.shape[0], 1
    while 4 * h <= n:
        parts = y.reshape(rows, n // (4 * h), 4, h)
        x0, x1, x2, x3 = (parts[:, :, k] for k in range(4))
        s0, d0, s1, d1 = x0 + x1, x0 - x1, x2 + x3, x2 - x3
        out = np.empty_like(parts)
        np.add(s0, s1, out=out[:, :, 0])
        np.add(d0, d1, out=out[:, :, 1])
        np.subtract(s0, s1, out=out[:, :, 2])
        np.subtract(d0, d1, out=out[:, :, 3])
        y, h = out.reshape(rows, n), 4 * h
    if h < n:
        pairs = y.reshape(rows, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = np.stack((a + b, a - b), axis=2)
    return y.reshape(*lead, n)


def fwht_blocks(x: np.ndarray, blocks, transform=None) -> np.ndarray:
    """Orthonormal block-diagonal Walsh–Hadamard transform along the last axis: :func:`fwht` (or
    ``transform``) of each block, then the ``x.dtype`` scale 1/sqrt(b) (the butterflies every
    kernel reproduces)."""
    transform = transform or fwht
    out = np.empty_like(x)
    start = 0
    for b in blocks:
        out[..., start : start + b] = transform(x[..., start : start + b]) * x.dtype.type(1.0 / np.sqrt(b))
        start += b
    return out


@functools.cache
def sylvester(n: int) -> np.ndarray:
    """The unnormalised ``n × n`` Walsh–Hadamard matrix in Sylvester order (float64, read-only)."""
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    h.flags.writeable = False
    return h


def fwht_by_products(x: np.ndarray) -> np.ndarray:
    """:func:`fwht` of float64 rows as two matrix products (``H_ac = H_a ⊗ H_c`` on each row seen as
    an ``a × c`` matrix): equal within rounding, not bit for bit, and 4–5× faster on large
    matrices. For statistics (Hessians), never for codes or decodes."""
    n = x.shape[-1]
    a = 1 << ((n.bit_length() - 1) // 2)
    c = n // a
    y = (np.ascontiguousarray(x).reshape(-1, c) @ sylvester(c)).reshape(-1, a, c)
    return np.matmul(sylvester(a), y).reshape(x.shape)


@attrs.frozen(eq=False)
class HadamardTransform:
    """``T = blockdiag(H_b / sqrt(b)) · diag(signs)`` over ``cols_p`` columns (blocks: powers of 2)."""

    signs: np.ndarray  # float32 ±1, (cols_p,)
    blocks: tuple[int, ...]

    @property
    def cols_p(self) -> int:
        return int(self.signs.shape[0])

    @property
    def key(self) -> tuple:
        """Equal keys mean equal transforms: matrices that share one share the rotated input."""
        return (self.blocks, self.signs.tobytes())

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """Rows of ``x`` (…, cols_p) times ``Tᵀ``."""
        return fwht_blocks(x * self.signs.astype(x.dtype), self.blocks)

    def unrotate(self, x: np.ndarray) -> np.ndarray:
        """Rows of ``x`` (…, cols_p) times ``T``."""
        return fwht_blocks(x, self.blocks) * self.signs.astype(x.dtype)

    def sandwich(self, h: np.ndarray) -> np.ndarray:
        """``T h Tᵀ`` of a symmetric float64 ``h`` (cols_p²), by :func:`fwht_by_products` (a Hessian
        in the rotated basis)."""
        def rotate_rows(x):
            return fwht_blocks(x * self.signs.astype(np.float64), self.blocks, fwht_by_products)

        return rotate_rows(np.ascontiguousarray(rotate_rows(h).T))


def pack_nibble_blocks(codes: np.ndarray) -> np.ndarray:
    """uint8 codes (rows, cols_p) below 16, ``cols_p`` a multiple of 32 -> uint8 (rows, cols_p / 2)
    *nibble blocks*, the native engine's own packing: per 32 columns 16 bytes, byte ``t`` = code
    ``t`` | code ``t + 16`` << 4 (a byte's two nibbles unpack to the block's two halves at once)."""
    rows, cols_p = codes.shape
    if cols_p % 32:
        raise ValueError(f"nibble blocks need a width that is a multiple of 32, got {cols_p}")
    halves = codes.reshape(rows, cols_p // 32, 2, 16)
    return (halves[:, :, 0] | (halves[:, :, 1] << np.uint8(4))).reshape(rows, cols_p // 2)


def unpack_nibble_blocks(nibbles: np.ndarray) -> np.ndarray:
    """The inverse of :func:`pack_nibble_blocks`: uint8 (rows, 2 * nibbles' width)."""
    rows, half = nibbles.shape
    blocks = nibbles.reshape(rows, half // 16, 16)
    out = np.empty((rows, half // 16, 2, 16), dtype=np.uint8)
    np.bitwise_and(blocks, np.uint8(15), out=out[:, :, 0])
    np.right_shift(blocks, np.uint8(4), out=out[:, :, 1])
    return out.reshape(rows, 2 * half)


@attrs.frozen(eq=False)
class Lowered:
    """One matrix in the canonical layout (see the module docstring)."""

    rows: int
    cols: int
    bits: int  # 2..8, or 32 for dense float32
    group_size: int = 0
    #: uint8 (rows, cols_p), one code per byte (given, or unpacked from ``nibbles`` on first use)
    _codes: np.ndarray | None = attrs.field(default=None, alias="codes")
    levels: np.ndarray | None = None  # float32 (2**bits,)
    step: np.ndarray | None = None  # float32 (rows, ceil(cols_p / group_size))
    offset: np.ndarray | None = None  # like step, or None
    dense: np.ndarray | None = None  # float32 (rows, cols_p) when bits == 32
    transform: HadamardTransform | None = None
    #: optional factorisation of ``step`` (no offset): ``step == step_row[:, None] * step_code``
    #: (float32 product) with ``step_row`` float32 (rows,) and ``step_code`` uint8 (rows, groups);
    #: kernels may store it instead (5 bytes a row-group less memory traffic per 4)
    step_row: np.ndarray | None = None
    step_code: np.ndarray | None = None
    #: optional, with 8-bit codes: each code's low ``8 - t`` bits are the previous code's (in its
    #: row) high ones — the windows of a bit-shift trellis with ``t`` new bits a code; kernels may
    #: store each row as that ``t``-bit stream instead (``t`` bits a weight in memory, not 8)
    trellis_bits: int | None = None
    #: optional, instead of ``codes`` (bits <= 4, cols_p a multiple of 32): the codes as
    #: :func:`pack_nibble_blocks` packs them, uint8 (rows, cols_p / 2); a native engine may read
    #: this array in place (a codec's mapped payload) rather than repack the codes
    nibbles: np.ndarray | None = None

    def __attrs_post_init__(self):
        self.check()

    @property
    def codes(self) -> np.ndarray | None:
        """uint8 (rows, cols_p), one code per byte (coded layouts)."""
        if self._codes is None and self.nibbles is not None:
            object.__setattr__(self, "_codes", unpack_nibble_blocks(self.nibbles))
        return self._codes

    @property
    def cols_p(self) -> int:
        if self.bits == 32:
            return int(self.dense.shape[1])
        return int(self._codes.shape[1] if self._codes is not None else 2 * self.nibbles.shape[1])

    @property
    def groups(self) -> int:
        return -(-self.cols_p // self.group_size)

    def check(self) -> None:
        """Raise ``ValueError`` unless the arrays agree with each other and the contract."""
        def want(name, arr, shape, dtype):
            if arr is None or tuple(arr.shape) != shape or arr.dtype != np.dtype(dtype):
                got = "missing" if arr is None else f"{arr.dtype}{list(arr.shape)}"
                raise ValueError(f"lowered {name} is {got}, expected {np.dtype(dtype)}{list(shape)}")

        if self.bits == 32:
            if self.dense is None:
                raise ValueError("lowered dense matrix is missing")
            want("dense", self.dense, (self.rows, self.dense.shape[1]), np.float32)
        else:
            if not 2 <= self.bits <= 8 or self.group_size < 1 or (self._codes is None and self.nibbles is None):
                raise ValueError(f"lowered layout needs bits in 2..8 or 32 and codes, got bits={self.bits}")
            if self.nibbles is not None:
                want("nibbles", self.nibbles, (self.rows, self.nibbles.shape[1]), np.uint8)
                if self.bits > 4 or self.nibbles.shape[1] % 16:
                    raise ValueError(f"lowered nibbles need codes of at most 4 bits and a width that is a multiple "
                                     f"of 32, got {self.bits} bits, width {2 * self.nibbles.shape[1]}")
            if self._codes is not None:
                want("codes", self._codes, (self.rows, self.cols_p), np.uint8)
            want("levels", self.levels, (2**self.bits,), np.float32)
            want("step", self.step, (self.rows, self.groups), np.float32)
            if self.offset is not None:
                want("offset", self.offset, (self.rows, self.groups), np.float32)
        if (self.step_row is None) != (self.step_code is None):
            raise ValueError("lowered step_row and step_code come together")
        if self.step_row is not None:
            want("step_row", self.step_row, (self.rows,), np.float32)
            want("step_code", self.step_code, (self.rows, self.groups), np.uint8)
            if self.offset is not None or not np.array_equal(
                    self.step_row[:, None] * self.step_code.astype(np.float32), self.step):
                raise ValueError("lowered step is not step_row * step_code (or there is an offset)")
        if self.trellis_bits is not None and (self.bits != 8 or not 1 <= self.trellis_bits <= 7):
            raise ValueError(f"lowered trellis_bits {self.trellis_bits!r} needs 8-bit codes and 1..7 new bits")
        if self.cols_p < self.cols:
            raise ValueError(f"lowered width {self.cols_p} is narrower than the matrix ({self.cols})")
        if self.transform is not None and self.transform.cols_p != self.cols_p:
            raise ValueError(f"transform width {self.transform.cols_p} != lowered width {self.cols_p}")

    def values(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``W_c`` (float32, cols_p wide), before the transform."""
        if self.bits == 32:
            return np.array(self.dense[start:stop], dtype=np.float32)
        gs, cp = self.group_size, self.cols_p
        col_group = np.arange(cp) // gs
        w = self.levels[self.codes[start:stop]] * self.step[start:stop][:, col_group]
        if self.offset is not None:
            w += self.offset[start:stop][:, col_group]
        return w

    def decode_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``W`` (float32, cols wide): the numpy reference."""
        w = self.values(start, stop)
        if self.transform is not None:
            w = self.transform.unrotate(w)
        return np.ascontiguousarray(w[:, : self.cols])

    def decode(self) -> np.ndarray:
        return self.decode_rows(0, self.rows)

    def rotate_input(self, x: np.ndarray) -> np.ndarray:
        """(n, cols) inputs padded to ``cols_p`` and rotated (``pad(x) @ Tᵀ``), float32."""
        xp = np.zeros((x.shape[0], self.cols_p), dtype=np.float32)
        xp[:, : self.cols] = x
        return xp if self.transform is None else self.transform.rotate(xp)

    def linear(self, x: np.ndarray) -> np.ndarray:
        """(n, cols) float32 ``@ W.T`` -> (n, rows): the input rotated once, then row chunks of
        ``W_c`` (the numpy reference of every native kernel)."""
        xr = self.rotate_input(x)
        out = np.empty((x.shape[0], self.rows), dtype=np.float32)
        for start, stop in row_chunks(self.rows, self.cols_p):
            out[:, start:stop] = xr @ self.values(start, stop).T
        return out

    def grad_input(self, grad_out: np.ndarray) -> np.ndarray:
        """(n, rows) float32 ``@ W`` -> (n, cols): ``(g @ W_c) @ T``, cut to ``cols``."""
        acc = np.zeros((grad_out.shape[0], self.cols_p), dtype=np.float32)
        for start, stop in row_chunks(self.rows, self.cols_p):
            acc += grad_out[:, start:stop] @ self.values(start, stop)
        if self.transform is not None:
            acc = self.transform.unrotate(acc)
        return np.ascontiguousarray(acc[:, : self.cols])

    def unrotated_target(self, w: np.ndarray) -> np.ndarray:
        """The ``W_c`` (rows, cols_p) whose decode is closest to a float weight ``w`` (rows,
        cols): ``pad(w) @ Tᵀ`` (T is orthogonal), what rounding onto this layout aims at."""
        return self.rotate_input(np.asarray(w, dtype=np.float32).reshape(self.rows, self.cols))

    def with_values(self, **fields) -> Lowered:
        """A copy with some arrays replaced (codes, levels, step, offset); the step factorisation
        is dropped when ``step`` changes, the trellis form and the nibbles when ``codes`` do."""
        if "step" in fields:
            fields = {"step_row": None, "step_code": None, **fields}
        if "codes" in fields:
            fields = {"trellis_bits": None, "nibbles": None, **fields}
        return attrs.evolve(self, **fields)


def nearest_codes(levels: np.ndarray, u: np.ndarray) -> np.ndarray:
    """uint8 codes of the entries of ``levels`` nearest to ``u`` (ties to the lower value; of
    equal levels, the first code): rounding onto any level table."""
    levels = np.asarray(levels, dtype=np.float64)
    values, first = np.unique(levels, return_index=True)
    if len(values) == 1:
        return np.full(np.shape(u), first[0], dtype=np.uint8)
    edges = (values[1:] + values[:-1]) / 2
    return first[np.searchsorted(edges, u, side="left")].astype(np.uint8)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lower(encoded, *, cache: bool = True) -> Lowered | None:
    """``encoded`` (an ``rbe_core.abc.Encoded``, the layer above this one) in the canonical
    layout, or None when its codec has no lowering. Cached per
    tensor unless ``cache=False`` (a caller that copies the arrays, like the native engine)."""
    if cache and encoded in _CACHE:
        return _CACHE[encoded]
    fn = getattr(encoded.codec, "lower", None)
    found = fn(encoded) if fn is not None else None
    if found is not None and (found.rows, found.cols) != encoded.matrix_shape:
        raise ValueError(
            f"{encoded.codec.codec_id}: lowered to {found.rows}x{found.cols}, the tensor is "
            f"{encoded.matrix_shape[0]}x{encoded.matrix_shape[1]}"
        )
    if cache:
        _CACHE[encoded] = found
    return found
