"""Package discovery and the build hook for the cffi backend's C kernels; the rest of the
metadata (and the package data) lives in pyproject.toml.

Packages are *found*, never listed: the three import roots live in folders that do not all share
their import name (``plugins/`` is ``rbe_plugins``, ``backends/`` is ``rbe_backends``), which
``[tool.setuptools.packages.find]`` cannot express, so ``PACKAGE_DIR`` names the roots and
``_packages()`` adds every folder below them that has an ``__init__.py`` (a subpackage added or
removed later is picked up by the next build; tests/, benchmarks/, examples/ and docs/ lie
outside the roots and are never packaged).

``cffi_modules`` builds ``rbe_backends.cffi._kernels`` (API mode) from the portable sources.
``BuildExt`` additionally compiles each per-ISA source with its own flags (AVX2+FMA,
AVX-512F+BW) when the *target* is x86, links the objects in and defines ``RBE_WITH_X86_SIMD``;
which path runs is decided at run time in C (``__builtin_cpu_supports``), never from the build
machine's CPU. The extension is optional: if it cannot be compiled, rbe still installs and the
``cffi`` backend reports itself unavailable with the reason.
"""

from __future__ import annotations

import os
import sys
import sysconfig

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "backends", "cffi"))
import build_ffi  # noqa: E402  (the cffi build script, also named in cffi_modules)

sys.path.pop(0)


#: Import name of each top-level package -> its folder (relative to this file).
PACKAGE_DIR = {"rbe_core": "rbe_core", "rbe_plugins": "plugins", "rbe_backends": "backends"}


def _packages() -> list[str]:
    """Every package under the roots of ``PACKAGE_DIR`` (folders with an ``__init__.py``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = []
    for name, folder in PACKAGE_DIR.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(where=os.path.join(here, folder))]
    return sorted(found)


def _x86_target() -> bool:
    plat = sysconfig.get_platform().lower()
    return any(tag in plat for tag in ("x86_64", "amd64", "i686", "i386")) and os.name == "posix"


class BuildExt(build_ext):
    """build_ext that adds the separately-flagged ISA objects to the cffi kernel module."""

    def build_extension(self, ext):
        if ext.name == build_ffi.MODULE and _x86_target() and self.compiler.compiler_type == "unix":
            try:
                objects = []
                for name, flags in build_ffi.ISA_SOURCES.items():
                    src = os.path.relpath(os.path.join(build_ffi.SRC, name))
                    objects += self.compiler.compile(
                        [src],
                        output_dir=self.build_temp,
                        include_dirs=[os.path.relpath(build_ffi.SRC)],
                        extra_postargs=[*build_ffi.COMMON_FLAGS, *flags],
                        debug=self.debug,
                    )
            except CompileError as exc:
                self.warn(
                    f"rbe: SIMD kernels not built ({exc}); the cffi backend will run scalar only"
                )
            else:
                ext.extra_objects = [*ext.extra_objects, *objects]
                ext.depends = [*ext.depends, *objects]  # relink when an ISA object changes
                ext.define_macros = [*ext.define_macros, ("RBE_WITH_X86_SIMD", "1")]
        super().build_extension(ext)


setup(
    package_dir=PACKAGE_DIR,
    packages=_packages(),
    cffi_modules=["backends/cffi/build_ffi.py:ffibuilder", "plugins/_trellis_build.py:ffibuilder"],
    cmdclass={"build_ext": BuildExt},
)
