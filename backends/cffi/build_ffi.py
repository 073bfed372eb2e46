"""cffi build script (API mode) for ``rbe_backends.cffi._kernels``.

Used by ``setup.py`` through ``cffi_modules``. This script builds the portable part (ISA
selection, the engine and the scalar kernels); ``setup.py`` compiles the AVX2 and AVX-512 files
separately, each with its own flags, links them in and defines ``RBE_WITH_X86_SIMD``; without
that step the module has only the scalar path.
"""

from __future__ import annotations

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "src")
MODULE = "rbe_backends.cffi._kernels"

#: Sources compiled with the extension's common flags.
PORTABLE_SOURCES = ["dispatch.c", "engine.c", "kernels_scalar.c"]
#: Per-ISA sources and the only flags that differ for each (compiled by setup.py).
ISA_SOURCES = {
    "kernels_avx2.c": ["-mavx2", "-mfma", "-mf16c"],
    "kernels_avx512.c": ["-mavx512f", "-mavx512bw", "-mf16c"],
    "kernels_avx512vbmi.c": ["-mavx512f", "-mavx512bw", "-mf16c", "-mavx512vl", "-mavx512vbmi", "-mavx512vnni"],
}
#: No implicit FMA contraction: decode's "multiply, then add" must stay two roundings.
COMMON_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
#: Headers whose declarations form the cffi interface.
CDEF_HEADERS = ["rbe_kernels.h", "rbe_engine.h"]


def _rel(path: str) -> str:
    """Sources relative to the working directory (setuptools places objects by source path)."""
    return os.path.relpath(path)


ffibuilder = FFI()
for header in CDEF_HEADERS:
    with open(os.path.join(SRC, header), encoding="utf-8") as f:
        ffibuilder.cdef(f.read())
ffibuilder.set_source(
    MODULE,
    '#include "rbe_kernels.h"\n#include "rbe_engine.h"',
    sources=[_rel(os.path.join(SRC, s)) for s in PORTABLE_SOURCES],
    depends=[_rel(os.path.join(SRC, h)) for h in sorted(os.listdir(SRC)) if h.endswith(".h")],
    include_dirs=[_rel(SRC)],
    extra_compile_args=COMMON_FLAGS,
    extra_link_args=["-pthread"],
    optional=True,  # rbe installs without a C compiler; the backend then reports why it is off
)
