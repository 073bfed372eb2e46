"""``cffi``: the ``CffiBackend`` class (C kernels, SIMD dispatch, native decoder) and its hook.

Fused decode+GEMV/GEMM for every codec that lowers to the canonical layout (input padded and
rotated once in C; codes through the level table, decoded in registers for batch 1, a few rows at
a time otherwise; never the whole matrix), on up to ``RBE_CFFI_THREADS`` threads, with the GIL
released. Codecs that do not lower run through a registered plugin kernel or the generic path.
The C module is built at ``pip install``; when it is missing, the backend is unavailable (with
the reason) and calls raise ``BackendUnavailableError``.

Modules, each importing only those after it: ``engine.py`` (``NativeDecoder``: a whole Llama /
GPT-2 step in C, ``src/engine.c``), ``ops.py`` (the matrix products, ``LoweredMatrix``),
``library.py`` (the compiled module, ISA path and thread settings).
"""

from __future__ import annotations

from rbe_core import hookimpl
from rbe_core.abc import NumpyKernelBackend
from rbe_core.arrays import dtype_name, is_torch, like, to_numpy_f32
from rbe_core.errors import NativeUnavailableError

from . import library, ops
from .engine import NativeDecoder

IMPORT_ERROR_HINT = "the C module is missing: "


class CffiBackend(NumpyKernelBackend):
    name = "cffi"
    priority = 30

    @classmethod
    def availability(cls):
        if library.lib is None:
            return False, library.IMPORT_ERROR
        try:
            library.active_isa()
        except ValueError as exc:
            return False, str(exc)
        return True, ""

    @classmethod
    def features(cls):
        """Usable ISA paths (e.g. 'avx512', 'avx2', 'scalar'), then 'active=<path>' and 'threads=<n>'."""
        if library.lib is None:
            return ()
        try:
            active = library.active_isa()
        except ValueError as exc:
            active = f"invalid: {exc}"
        return (*library.supported_isas(), f"active={active}", f"threads={library.thread_count()}")

    def native_decoder(self, plan, tensors):
        """The C decoder engine (``engine.NativeDecoder``) for Llama and GPT-2 models whose every
        matrix lowers to the canonical layout."""
        if library.lib is None:
            raise NativeUnavailableError(IMPORT_ERROR_HINT + library.IMPORT_ERROR)
        return NativeDecoder(plan, tensors)

    def own_linear(self, x, encoded, bias=None):
        if not self._direct(x, encoded):
            return super().own_linear(x, encoded, bias)
        out = self._torch_call("linear", x, encoded)
        if bias is not None:
            out.numpy()[...] += to_numpy_f32(bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def own_linear_grad_input(self, grad_out, encoded):
        if not self._direct(grad_out, encoded):
            return super().own_linear_grad_input(grad_out, encoded)
        out = self._torch_call("grad_input", grad_out, encoded)
        return out if out.dtype == grad_out.dtype else out.to(grad_out.dtype)

    @staticmethod
    def _direct(x, encoded) -> bool:
        """CPU torch input to a C kernel: run on its memory, skipping the numpy round trip."""
        return is_torch(x) and x.device.type == "cpu" and ops.matrix(encoded) is not None

    @staticmethod
    def _torch_call(op: str, t, encoded):
        """``op`` on CPU tensor ``t`` (any float dtype): a float32 view or copy of it goes to C, and the
        result comes back as a float32 tensor sharing the C output's memory (``like``)."""
        rows, cols = encoded.matrix_shape
        width, out_width = (cols, rows) if op == "linear" else (rows, cols)
        if t.shape[-1] != width:
            raise ValueError(f"input's last dimension is {t.shape[-1]}, the weight expects {width}")
        a = t.detach().reshape(-1, width)
        if dtype_name(a) != "float32" or not a.is_contiguous():
            a = a.float().contiguous()
        fn = ops.linear if op == "linear" else ops.grad_input
        return like(fn(a.numpy(), encoded), a).view(*t.shape[:-1], out_width)

    def linear_np(self, x, encoded):
        return ops.linear(x, encoded)

    def grad_input_np(self, grad_out, encoded):
        return ops.grad_input(grad_out, encoded)


@hookimpl
def rbe_register_backends(register):
    register(CffiBackend)
