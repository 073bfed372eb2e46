"""The compiled C module (``ffi``, ``lib``) and its settings: ISA path, thread count, return codes.

``rbe_backends.cffi._kernels`` is built at ``pip install`` (``build_ffi.py``, ``setup.py``); when it
is missing or broken, ``lib`` is None, ``IMPORT_ERROR`` says why and :func:`require_lib` raises
``BackendUnavailableError``. Nothing else in the backend touches the import.

Environment: ``RBE_CFFI_ISA=scalar|avx2|avx512|avx512vbmi`` forces a code path (an error if this CPU or
build lacks it); ``RBE_CFFI_THREADS=N`` sets the thread count (default: usable cores, at most 8).
"""

from __future__ import annotations

import functools
import os

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
ISAS = {"avx512vbmi": 8, "avx512": 4, "avx2": 2, "scalar": 1}

_ERRORS = {1: "instruction set not available", 2: "invalid arguments", 3: "out of memory",
           5: "token id out of range", 6: "context length exceeded", 7: "model incomplete"}


def require_lib():
    """The compiled module's ``lib``; ``BackendUnavailableError`` (with the reason) when it is missing."""
    if lib is None:
        raise BackendUnavailableError(f"backend 'cffi' is not available: {IMPORT_ERROR}")
    return lib


def compiled_isas() -> tuple[str, ...]:
    """ISA paths built into the module, best first."""
    mask = require_lib().rbe_isa_compiled()
    return tuple(name for name, bit in ISAS.items() if mask & bit)


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """Compiled ISA paths this CPU can run (checked in C with ``__builtin_cpu_supports``), best first."""
    mask = require_lib().rbe_isa_supported()
    return tuple(name for name, bit in ISAS.items() if mask & bit)


def has_int8_product(isa: str) -> bool:
    """Whether the ``isa`` path multiplies int8-quantized inputs on this CPU (else float32 only)."""
    return bool(require_lib().rbe_isa_int8(ISAS[isa]))


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
