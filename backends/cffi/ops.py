"""Python side of the C kernels: ISA and thread choice, and the matrix products.

Every codec that lowers (``Codec.lower``) runs in C on its canonical layout: the tensor is
lowered once and copied into a ``LoweredMatrix`` (``engine.py``), one per direction (``x @ W.T``
for the forward, ``g @ W`` for ``grad_input``, built when first asked for); the input is padded
and rotated in C, then multiplied through the level table. Layouts the C kernels reject run on
the numpy reference of the lowered layout; codecs that do not lower take the generic path
(``rbe_core.native.generic``). cffi calls in API mode release the GIL for their duration.

Environment: ``RBE_CFFI_ISA=scalar|avx2|avx512`` forces a code path (an error if this CPU or
build lacks it); ``RBE_CFFI_THREADS=N`` sets the thread count (default: usable cores, at most 8).
"""

from __future__ import annotations

import functools
import logging
import os
import weakref

import numpy as np

from rbe_core.abc import Encoded
from rbe_core.errors import BackendUnavailableError, NativeUnavailableError
from rbe_core.native import generic, lower

log = logging.getLogger("rbe")

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


#: Multiply-adds each thread of one matrix product must get for the product to use it: between
#: products the pool's workers sleep (they would take cores from torch's OpenMP pool), and waking one
#: costs tens of microseconds (SmolLM2's 576-wide matrices at batch 1 run faster on one thread).
WAKE_WORK = 1 << 20


def threads_for(work: int) -> int:
    """Threads for one matrix product of ``work`` multiply-adds: at most ``thread_count()``."""
    return max(1, min(thread_count(), work // WAKE_WORK))


@functools.cache
def _usable_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def engine_error(rc: int) -> str:
    """The meaning of a C return code."""
    return _ERRORS.get(rc, f"error {rc}")


#: Per encoded tensor and direction: its ``LoweredMatrix``, or None when it does not lower or the
#: C kernels reject its layout (then the numpy reference runs the lowered layout).
_MATRICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def matrix(encoded: Encoded, transposed: bool = False):
    """``encoded`` lowered and copied into the C kernels (``transposed``: for ``g @ W``), built
    once per tensor and direction; None when its codec does not lower or the layout is rejected."""
    from .engine import LoweredMatrix

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
