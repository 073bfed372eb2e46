"""``cffi``: C kernels with runtime SIMD dispatch (AVX-512, AVX2+FMA, portable scalar).

Fused decode+GEMV/GEMM for ``int8`` and ``int4`` (weights are decoded in registers for batch 1,
a few rows at a time otherwise; never the whole matrix), on up to ``RBE_CFFI_THREADS`` pthreads,
with the GIL released. Other codecs run through the numpy backend's generic row-chunked path and
``supports()`` is False for them. The C module is built at ``pip install``; when it is missing,
the backend is unavailable (with the reason) and calls raise ``BackendUnavailableError``.
"""

from __future__ import annotations

from rbe_core import hookimpl
from rbe_core.abc import NumpyKernelBackend

from . import ops


class CffiBackend(NumpyKernelBackend):
    name = "cffi"
    priority = 30
    kernels = ops.KERNEL_CODECS

    @classmethod
    def availability(cls):
        if ops.lib is None:
            return False, ops.IMPORT_ERROR
        try:
            ops.active_isa()
        except ValueError as exc:
            return False, str(exc)
        return True, ""

    @classmethod
    def features(cls):
        """Usable ISA paths (e.g. 'avx512', 'avx2', 'scalar'), then 'active=<path>' and 'threads=<n>'."""
        if ops.lib is None:
            return ()
        try:
            active = ops.active_isa()
        except ValueError as exc:
            active = f"invalid: {exc}"
        return (*ops.supported_isas(), f"active={active}", f"threads={ops.thread_count()}")

    def linear_np(self, x, encoded):
        return ops.linear(x, encoded)

    def grad_input_np(self, grad_out, encoded):
        return ops.grad_input(grad_out, encoded)


@hookimpl
def rbe_register_backends(register):
    register(CffiBackend)
