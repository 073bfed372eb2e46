"""cffi build script (API mode) for ``rbe_plugins._trellis_c``, the trellis codec's Viterbi search
in C (``src/trellis_search.c``; ``setup.py`` names it in ``cffi_modules``). Optional: without a C
compiler the codec searches in numpy, with the same result."""

from __future__ import annotations

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "src")

ffibuilder = FFI()
with open(os.path.join(SRC, "trellis_search.h"), encoding="utf-8") as f:
    ffibuilder.cdef(f.read())
ffibuilder.set_source(
    "rbe_plugins._trellis_c",
    '#include <stdint.h>\n#include "trellis_search.h"',
    sources=[os.path.relpath(os.path.join(SRC, "trellis_search.c"))],
    include_dirs=[os.path.relpath(SRC)],
    extra_compile_args=["-O3", "-fno-math-errno", "-ffp-contract=off"],
    optional=True,
)
