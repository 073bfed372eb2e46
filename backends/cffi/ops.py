"""Python side of the C kernels: argument checks, ISA and thread choice, and the calls.

Codecs with a C kernel are listed in ``KERNEL_CODECS``; every other codec goes through the
numpy backend's generic row-chunked path (``rbe_backends.numpy.ops``). ``hadamard`` payloads run
in C only when ``rbe_backends.numpy.hadamard.native`` recognises their layout exactly (the input
is rotated in C, then multiplied by the codes in the rotated basis); others take the generic path. The C functions are
called through cffi in API mode, which releases the GIL for the duration of each call.

Environment: ``RBE_CFFI_ISA=scalar|avx2|avx512`` forces a code path (an error if this CPU or
build lacks it); ``RBE_CFFI_THREADS=N`` sets the thread count (default: usable cores, at most 8).
"""

from __future__ import annotations

import functools
import os
import weakref

import numpy as np

from rbe_backends.numpy import hadamard as had
from rbe_backends.numpy import ops as generic
from rbe_core.abc import Encoded
from rbe_core.errors import BackendUnavailableError

try:
    from ._kernels import ffi, lib
except ImportError as exc:  # not compiled (no C compiler at install time) or broken build
    ffi = lib = None
    IMPORT_ERROR = (
        f"the compiled module rbe_backends.cffi._kernels cannot be imported ({exc}); "
        "reinstall rbe on a machine with a C compiler and the Python headers"
    )
else:
    IMPORT_ERROR = ""

ISA_ENV = "RBE_CFFI_ISA"
THREADS_ENV = "RBE_CFFI_THREADS"
#: ISA names and their C bit, best first.
ISAS = {"avx512": 4, "avx2": 2, "scalar": 1}
KERNEL_CODECS = frozenset({"int8", "int4", "hadamard"})
#: Below this many multiply-adds per call a second thread costs more than it saves.
PARALLEL_MIN_WORK = 1 << 18

_ERRORS = {1: "instruction set not available", 2: "invalid arguments", 3: "out of memory",
           5: "token id out of range", 6: "context length exceeded", 7: "model incomplete"}


def _require_lib():
    if lib is None:
        raise BackendUnavailableError(f"backend 'cffi' is not available: {IMPORT_ERROR}")
    return lib


def compiled_isas() -> tuple[str, ...]:
    """ISA paths built into the module, best first."""
    mask = _require_lib().rbe_isa_compiled()
    return tuple(name for name, bit in ISAS.items() if mask & bit)


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """Compiled ISA paths this CPU can run (checked in C with ``__builtin_cpu_supports``), best first."""
    mask = _require_lib().rbe_isa_supported()
    return tuple(name for name, bit in ISAS.items() if mask & bit)


def active_isa() -> str:
    """The path calls use now: ``$RBE_CFFI_ISA`` if set (validated), else the best supported one."""
    supported = supported_isas()
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if not forced:
        return supported[0]
    if forced not in ISAS:
        raise ValueError(f"{ISA_ENV}={forced!r}: expected one of {', '.join(ISAS)}")
    if forced not in supported:
        why = "this CPU lacks it" if forced in compiled_isas() else "this build does not include it"
        raise ValueError(f"{ISA_ENV}={forced}: {why} (usable here: {', '.join(supported)})")
    return forced


def thread_count() -> int:
    """Threads for large calls: ``$RBE_CFFI_THREADS``, else the usable cores (at most 8)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{THREADS_ENV}={value!r}: expected a positive integer")
        return int(value)
    return _usable_cores()


@functools.cache
def _usable_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def _threads_for(work: int) -> int:
    threads = thread_count()  # validates the setting on every call
    return threads if work >= PARALLEL_MIN_WORK else 1


def _array(encoded: Encoded, field: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    arr = encoded.payload[field]
    if tuple(arr.shape) != shape or arr.dtype != np.dtype(dtype):
        raise ValueError(
            f"{encoded.codec.codec_id}: payload {field!r} is {arr.dtype}{list(arr.shape)}, "
            f"the cffi kernel needs {np.dtype(dtype)}{list(shape)}"
        )
    return np.ascontiguousarray(arr)


def _int4_layout(encoded: Encoded) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = encoded.matrix_shape
    gs = int(encoded.codec.group_size)
    cols_p = -(-cols // gs) * gs
    q = _array(encoded, "q", (rows, cols_p // 2), np.uint8)
    scale = _array(encoded, "scale", (rows, cols_p // gs), np.float16).view(np.uint16)
    minimum = _array(encoded, "minimum", (rows, cols_p // gs), np.float16).view(np.uint16)
    return gs, q, scale, minimum


def has_kernel(encoded: Encoded) -> bool:
    """True when ``encoded`` runs in C (for hadamard: only the exact layout the kernel knows)."""
    codec_id = encoded.codec.codec_id
    return codec_id in ("int8", "int4") or (codec_id == had.CODEC_ID and had.native(encoded))


def engine_error(rc: int) -> str:
    """The meaning of a C return code."""
    return _ERRORS.get(rc, f"error {rc}")


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"cffi kernel {what} failed: {engine_error(rc)}")


#: Per encoded tensor: (linear fn, grad fn, weight arguments as cffi pointers, arrays they point into).
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepared(encoded: Encoded):
    """The C functions and weight arguments for ``encoded``, checked and converted once."""
    hit = _PREPARED.get(encoded)
    if hit is not None:
        return hit
    lib = _require_lib()
    rows, cols = encoded.matrix_shape
    if encoded.codec.codec_id == "int8":
        q = _array(encoded, "q", (rows, cols), np.int8)
        scale = _array(encoded, "scale", (rows,), np.float32)
        keep = (q, scale)
        args = (ffi.from_buffer("signed char[]", q), ffi.from_buffer("float[]", scale), rows, cols)
        fns = lib.rbe_int8_linear, lib.rbe_int8_grad_input
    elif encoded.codec.codec_id == had.CODEC_ID:
        keep, args = _hadamard_args(encoded)
        fns = lib.rbe_hadamard_linear, lib.rbe_hadamard_grad_input
    else:
        gs, q, scale, minimum = _int4_layout(encoded)
        keep = (q, scale, minimum)
        args = (
            ffi.from_buffer("unsigned char[]", q),
            ffi.from_buffer("unsigned short[]", scale),
            ffi.from_buffer("unsigned short[]", minimum),
            rows,
            cols,
            gs,
        )
        fns = lib.rbe_int4_linear, lib.rbe_int4_grad_input
    _PREPARED[encoded] = hit = (*fns, args, keep)
    return hit


def _hadamard_args(encoded: Encoded):
    """Weight arguments of ``rbe_hadamard_*`` (after ``n``, before ``out``) and their arrays."""
    found = had.layout(encoded)
    if found is None:
        raise ValueError("hadamard: payload layout not supported by the cffi kernel")
    cols_p, signs, blocks, levels = found
    rows, cols = encoded.matrix_shape
    p = encoded.payload
    codes = np.ascontiguousarray(p["codes"])
    scale_code = np.ascontiguousarray(p["scale_code"])
    row_scale = np.ascontiguousarray(p["row_scale"])
    blocks_arr = np.asarray(blocks, dtype=np.int64)
    keep = (codes, scale_code, row_scale, levels, signs, blocks_arr)
    args = (
        cols,
        ffi.from_buffer("unsigned char[]", codes),
        ffi.from_buffer("unsigned char[]", scale_code),
        ffi.from_buffer("float[]", row_scale),
        rows,
        cols_p,
        int(encoded.codec.group_size),
        int(encoded.codec.bits),
        ffi.from_buffer("float[]", levels),
        ffi.from_buffer("float[]", signs),
        ffi.from_buffer("long long[]", blocks_arr),
        len(blocks),
    )
    return keep, args


def call_into(op: str, a: np.ndarray, encoded: Encoded, out: np.ndarray) -> np.ndarray:
    """Run the C kernel ``op`` ('linear' or 'grad_input') on float32 C-contiguous ``a`` (n, k)
    into float32 C-contiguous ``out``; ``has_kernel(encoded)`` must hold."""
    rows, cols = encoded.matrix_shape
    isa = ISAS[active_isa()]
    n = a.shape[0]
    threads = _threads_for(n * rows * cols)
    fn_linear, fn_grad, args, _ = _prepared(encoded)
    fn = fn_linear if op == "linear" else fn_grad
    rc = fn(ffi.from_buffer("float[]", a), n, *args, ffi.from_buffer("float[]", out, require_writable=True),
            isa, threads)
    _check(rc, f"{encoded.codec.codec_id} {op}")
    return out


def linear(x: np.ndarray, encoded: Encoded) -> np.ndarray:
    """(n, in) float32 @ W.T -> (n, out) float32; C kernel when ``has_kernel``, else generic."""
    if not has_kernel(encoded):
        return generic.linear(x, encoded)
    rows, _ = encoded.matrix_shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    return call_into("linear", x, encoded, np.empty((x.shape[0], rows), dtype=np.float32))


def grad_input(grad_out: np.ndarray, encoded: Encoded) -> np.ndarray:
    """(n, out) float32 @ W -> (n, in) float32; C kernel when ``has_kernel``, else generic."""
    if not has_kernel(encoded):
        return generic.grad_input(grad_out, encoded)
    _, cols = encoded.matrix_shape
    grad_out = np.ascontiguousarray(grad_out, dtype=np.float32)
    return call_into("grad_input", grad_out, encoded, np.empty((grad_out.shape[0], cols), dtype=np.float32))
