"""``torch`` (CPU) and ``cuda`` backends: the same torch kernels on two devices.

torch is imported when a backend is used, not when the plugin is registered.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from rbe_core import Backend, hookimpl
from rbe_core.arrays import is_torch, like


class TorchBackend(Backend):
    name = "torch"
    priority = 20
    device_type = "cpu"

    @classmethod
    def availability(cls):
        if importlib.util.find_spec("torch") is None:
            return False, "torch is not installed"
        return True, ""

    @classmethod
    def features(cls):
        import torch

        from . import ops

        try:
            chunk = f"chunk={ops.chunk_elements(torch.device(cls.device_type)) * 4 / (1 << 20):g}MiB"
        except ValueError as exc:  # a bad $RBE_TORCH_CHUNK_MB: shown here, raised by the kernels
            chunk = f"chunk=invalid ({exc})"
        return (f"torch-{torch.__version__}", cls.device_type, f"threads={torch.get_num_threads()}", chunk)

    @property
    def device(self):
        import torch

        return torch.device(self.device_type)

    def _in(self, x, width: int):
        import torch

        if x.shape[-1] != width:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, the weight expects {width}")
        t = x if is_torch(x) else torch.from_numpy(np.ascontiguousarray(x))
        return t.detach().to(self.device, torch.float32).reshape(-1, width)

    def _out(self, result, template, width: int):
        result = result.reshape(*template.shape[:-1], width)
        if is_torch(template):
            return result.to(template.device, template.dtype)
        return like(result.cpu().numpy(), template)

    def decode(self, encoded):
        from . import ops

        return ops.decode_rows(encoded, 0, encoded.matrix_shape[0], self.device).reshape(encoded.shape)

    def own_linear(self, x, encoded, bias=None):
        from . import ops

        rows, cols = encoded.matrix_shape
        out = ops.linear(self._in(x, cols), encoded)
        if bias is not None:
            out += self._in(bias, rows)[0]
        return self._out(out, x, rows)

    def own_linear_grad_input(self, grad_out, encoded):
        from . import ops

        rows, cols = encoded.matrix_shape
        return self._out(ops.grad_input(self._in(grad_out, rows), encoded), grad_out, cols)


#: What a machine whose GPUs torch can use has: the NVIDIA kernel driver, or ROCm's.
GPU_DRIVER_PATHS = ("/proc/driver/nvidia/version", "/dev/kfd")


class CudaBackend(TorchBackend):
    name = "cuda"
    priority = 40
    device_type = "cuda"

    @classmethod
    def availability(cls):
        ok, reason = super().availability()
        if not ok:
            return ok, reason
        if not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):  # decided without importing torch
            return False, f"no CUDA device: no GPU driver on this machine (none of {', '.join(GPU_DRIVER_PATHS)})"
        import torch

        if not torch.cuda.is_available():
            build = torch.version.cuda or "a CPU-only build"
            return False, f"no CUDA device visible to torch {torch.__version__} ({build})"
        return True, ""

    @classmethod
    def features(cls):
        import torch

        return (*super().features(), torch.cuda.get_device_name(0))


@hookimpl
def rbe_register_backends(register):
    register(TorchBackend)
    register(CudaBackend)
