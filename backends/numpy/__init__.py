"""``numpy``: the reference backend: lowered codecs on their canonical layout, others through
``Codec.decode_rows``; clear, not fast."""

from __future__ import annotations

from rbe_core import hookimpl
from rbe_core.abc import NumpyKernelBackend

from . import ops


class NumpyBackend(NumpyKernelBackend):
    name = "numpy"
    priority = 10

    @classmethod
    def availability(cls):
        return True, ""

    @classmethod
    def features(cls):
        return ("reference",)

    def linear_np(self, x, encoded):
        return ops.linear(x, encoded)

    def grad_input_np(self, grad_out, encoded):
        return ops.grad_input(grad_out, encoded)


@hookimpl
def rbe_register_backends(register):
    register(NumpyBackend)
