"""The matrix products in C: ``LoweredMatrix``, and ``linear`` / ``grad_input`` of a tensor.

Every codec that lowers (``Codec.lower``) runs in C on its canonical layout: the tensor is
lowered once and copied into a ``LoweredMatrix``, one per direction (``x @ W.T`` for the forward,
``g @ W`` for ``grad_input``, built when first asked for); the input is padded and rotated in C,
then multiplied through the level table. Layouts the C kernels reject run on the numpy reference
of the lowered layout; codecs that do not lower take the generic path (``rbe_core.native.generic``).
cffi calls in API mode release the GIL for their duration. The ISA path and thread count come from
``library`` (``RBE_CFFI_ISA``, ``RBE_CFFI_THREADS``).
"""

from __future__ import annotations

import logging
import weakref

import numpy as np

from rbe_core.abc import Encoded
from rbe_core.errors import NativeUnavailableError
from rbe_core.native import Lowered, generic, lower

from . import library

log = logging.getLogger("rbe")


def as_f32(a) -> np.ndarray:
    """``a`` as a C-contiguous float32 array (the kernels' element type)."""
    return np.ascontiguousarray(a, dtype=np.float32)


def matrix_desc(ffi, low: Lowered, bias=None, transposed: bool = False, tf: int = -1, *, borrow: bool = False):
    """An ``rbe_matrix_desc`` for ``low`` and the arrays it points into (keep them alive). With
    ``borrow`` the engine reads ``low.nibbles`` in place (``desc.borrow`` says whether it does:
    a non-contiguous array is copied): the caller keeps that array alive as long as the engine."""
    d = ffi.new("rbe_matrix_desc *")
    keep = []

    def ptr(kind, arr):
        keep.append(arr)
        return ffi.from_buffer(kind, arr)

    d.rows, d.cols, d.cols_p = low.rows, low.cols, low.cols_p
    d.bits, d.transposed, d.transform = low.bits, int(bool(transposed)), tf
    if low.bits == 32:
        d.group_size = low.cols_p
        d.dense = ptr("float[]", as_f32(low.dense))
    else:
        d.group_size = low.group_size
        if low.nibbles is not None:
            nibbles = np.ascontiguousarray(low.nibbles)
            d.nibbles = ptr("unsigned char[]", nibbles)
            d.borrow = int(borrow and nibbles is low.nibbles)
        else:
            d.codes = ptr("unsigned char[]", np.ascontiguousarray(low.codes))
        d.levels = ptr("float[]", as_f32(low.levels))
        d.step = ptr("float[]", as_f32(low.step))
        if low.offset is not None:
            d.offset = ptr("float[]", as_f32(low.offset))
        if low.step_row is not None:
            d.step_row = ptr("float[]", as_f32(low.step_row))
            d.step_code = ptr("unsigned char[]", np.ascontiguousarray(low.step_code, dtype=np.uint8))
        d.trellis_bits = low.trellis_bits or 0
    if bias is not None:
        d.bias = ptr("float[]", as_f32(bias).reshape(-1))
    return d, keep


def rejection(low: Lowered, rc: int) -> str:
    """Why the C side refused ``low`` with return code ``rc``."""
    if rc == 2:
        return (f"its layout ({low.bits}-bit, group {low.group_size}) is outside the engine's: the group "
                "size must be a multiple of 32 dividing the padded width, or the whole row")
    return library.engine_error(rc)


class LoweredMatrix:
    """One lowered matrix in the C kernels: ``linear(x)`` is ``x @ W.T`` (``x @ W`` when
    ``transposed``) plus the bias, run on the active ISA path and thread count; calls from several
    threads are serialised in C (all such matrices share one set of scratch buffers; the GIL is
    released meanwhile)."""

    def __init__(self, low: Lowered, bias=None, transposed: bool = False):
        lib, ffi = library.require_lib(), library.ffi
        self._lib, self._ffi, self.low, self.transposed = lib, ffi, low, transposed
        d, _keep = matrix_desc(ffi, low, bias, transposed)
        t = low.transform
        if t is None:
            handle = lib.rbe_matrix_new(d, ffi.NULL, ffi.NULL, 0)
        else:
            blocks = np.asarray(t.blocks, dtype=np.int64)
            handle = lib.rbe_matrix_new(d, ffi.from_buffer("float[]", as_f32(t.signs)),
                                        ffi.from_buffer("long long[]", blocks), len(blocks))
        if handle == ffi.NULL:
            raise NativeUnavailableError(f"lowered matrix rejected: {rejection(low, 2)}")
        self._h = ffi.gc(handle, lib.rbe_matrix_free)
        self.in_features, self.out_features = (low.rows, low.cols) if transposed else (low.cols, low.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the matrix as the C side stores it (codes, steps, bias)."""
        return int(self._lib.rbe_matrix_bytes(self._h))

    def linear(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, self.in_features)
        y = np.empty((x.shape[0], self.out_features), dtype=np.float32)
        ffi = self._ffi
        isa = library.ISAS[library.active_isa()]
        threads = library.threads_for(x.shape[0] * self.low.rows * self.low.cols)
        rc = self._lib.rbe_matrix_linear(self._h, ffi.from_buffer("float[]", x), x.shape[0],
                                         ffi.from_buffer("float[]", y, require_writable=True), isa, threads)
        if rc:
            raise RuntimeError(f"lowered linear failed: {library.engine_error(rc)}")
        return y


#: Per encoded tensor and direction: its ``LoweredMatrix``, or None when it does not lower or the
#: C kernels reject its layout (then the numpy reference runs the lowered layout).
_MATRICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def matrix(encoded: Encoded, transposed: bool = False):
    """``encoded`` lowered and copied into the C kernels (``transposed``: for ``g @ W``), built
    once per tensor and direction; None when its codec does not lower or the layout is rejected."""
    per = _MATRICES.setdefault(encoded, {})
    if transposed not in per:
        low = lower(encoded, cache=False)
        m = None
        if low is not None:
            try:
                m = LoweredMatrix(low, transposed=transposed)
            except NativeUnavailableError as exc:
                log.info("rbe cffi backend: %s %s runs on the numpy reference: %s",
                         encoded.codec.codec_id, encoded.source or "tensor", exc)
        per[transposed] = m
    return per[transposed]


def linear(x: np.ndarray, encoded: Encoded) -> np.ndarray:
    """(n, in) float32 @ W.T -> (n, out) float32: C kernels on the lowered layout, else generic."""
    m = matrix(encoded)
    if m is not None:
        return m.linear(x)
    low = lower(encoded)  # a layout the C kernels reject: the numpy reference
    return low.linear(np.asarray(x, np.float32)) if low is not None else generic.linear(x, encoded, "cffi")


def grad_input(grad_out: np.ndarray, encoded: Encoded) -> np.ndarray:
    """(n, out) float32 @ W -> (n, in) float32: C kernels on the lowered layout, else generic."""
    m = matrix(encoded, transposed=True)
    if m is not None:
        return m.linear(grad_out)
    low = lower(encoded)  # a layout the C kernels reject: the numpy reference
    return low.grad_input(np.asarray(grad_out, np.float32)) if low is not None else generic.grad_input(
        grad_out, encoded, "cffi")
