"""``cffi``: C kernels with runtime SIMD dispatch (AVX-512, AVX2+FMA, portable scalar), and a
native decoder engine that runs a whole Llama / GPT-2 step in C (``engine.py``, ``src/engine.c``).

Fused decode+GEMV/GEMM for every codec that lowers to the canonical layout (input padded and
rotated once in C; codes through the level table, decoded in registers for batch 1, a few rows at
a time otherwise; never the whole matrix), on up to ``RBE_CFFI_THREADS`` threads, with the GIL
released. Codecs that do not lower run through a registered plugin kernel or the generic path.
The C module is built at ``pip install``; when it is missing, the backend is unavailable (with
the reason) and calls raise ``BackendUnavailableError``.
"""

from __future__ import annotations

from rbe_core import hookimpl
from rbe_core.abc import NumpyKernelBackend
from rbe_core.arrays import is_torch, to_numpy_f32

from . import ops

IMPORT_ERROR_HINT = "the C module is missing: "


class CffiBackend(NumpyKernelBackend):
    name = "cffi"
    priority = 30

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

    def native_decoder(self, plan, tensors):
        """The C decoder engine (``engine.NativeDecoder``) for Llama and GPT-2 models whose every
        matrix lowers to the canonical layout."""
        from .engine import NativeDecoder

        if ops.lib is None:
            from rbe_core.errors import NativeUnavailableError

            raise NativeUnavailableError(IMPORT_ERROR_HINT + ops.IMPORT_ERROR)
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
        import torch

        rows, cols = encoded.matrix_shape
        width, out_width = (cols, rows) if op == "linear" else (rows, cols)
        if t.shape[-1] != width:
            raise ValueError(f"input's last dimension is {t.shape[-1]}, the weight expects {width}")
        a = t.detach().reshape(-1, width)
        if a.dtype != torch.float32 or not a.is_contiguous():
            a = a.to(torch.float32).contiguous()
        fn = ops.linear if op == "linear" else ops.grad_input
        return torch.from_numpy(fn(a.numpy(), encoded)).view(*t.shape[:-1], out_width)

    def linear_np(self, x, encoded):
        return ops.linear(x, encoded)

    def grad_input_np(self, grad_out, encoded):
        return ops.grad_input(grad_out, encoded)


@hookimpl
def rbe_register_backends(register):
    register(CffiBackend)
