"""Registers the derivative engines ``autograd`` and ``cyclic`` without importing torch: each
loads its implementation (``rbe_plugins.torch_engines``) on first use."""

from __future__ import annotations

from typing import ClassVar

from rbe_core import DerivativeEngine, hookimpl


class _TorchEngine(DerivativeEngine):
    """A registered engine whose work is done by the class ``implementation`` of ``torch_engines``."""

    implementation: ClassVar[str]

    def __init__(self):
        self._engine = None

    def _loaded(self) -> DerivativeEngine:
        if self._engine is None:
            from . import torch_engines

            self._engine = getattr(torch_engines, self.implementation)()
        return self._engine

    def backward(self, encoded, x, grad_out, **options):
        return self._loaded().backward(encoded, x, grad_out, **options)

    def param_grads(self, encoded, grad_w, params=None):
        """``{field: dL/dfield}`` given ``grad_w = dL/dW`` (see ``torch_engines``)."""
        return self._loaded().param_grads(encoded, grad_w, params)


class AutogradEngine(_TorchEngine):
    """The reference: torch autograd through the codec's torch decode."""

    name = "autograd"
    implementation = "AutogradEngine"


class CyclicEngine(_TorchEngine):
    """Seed 002's table engine: factor derivatives from the 2-bit derivative-order counter."""

    name = "cyclic"
    implementation = "CyclicEngine"


@hookimpl
def rbe_register_derivative_engines(register):
    register(AutogradEngine)
    register(CyclicEngine)
