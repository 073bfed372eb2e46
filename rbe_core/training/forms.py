"""How training sees a codec: the ``TorchForm`` interface, phase-factor forms (``PhaseForm``)
and the array helpers forms share. Imports torch; nothing of rbe above the interfaces."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from ..abc import Encoded
from ..errors import RBEError


class TorchForm(abc.ABC):
    """How training sees one codec.

    Contract:
    - ``fields``: names of the continuous parameters.
    - ``params(encoded)``: ``{field: float64 ndarray}``, the values the decode uses now.
    - ``decode(encoded, params)``: the (rows, cols) weight as a torch tensor computed from ``params``
      (torch tensors of one float dtype and device; the result has that dtype) and ``encoded``'s
      discrete fields; differentiable in ``params``; equals ``encoded.decode()`` to float32 rounding
      when ``params == self.params(encoded)``.
    - ``write(encoded, params)``: a valid ``Encoded`` of the same codec holding ``params`` rounded
      to their storage type (numpy or torch values accepted).
    - Optional ``linear(x, encoded, params, transposed)``: ``x @ W.T`` (``x @ W``) with W the stored
      form of ``params``, differentiable in ``x`` and ``params`` (torch autograd, straight through
      the storage rounding) without building W; when set, ``TrainableRBELinear`` trains through it
      instead of the backend and the engine (codecs whose decode is costly, e.g. a rotation).
    - ``row_wise``: True when every payload array and every parameter is stored row by row
      (leading axis = matrix rows) and decoding a row slice of them gives those rows of the
      weight; engines then take parameter gradients a row chunk at a time (at most a chunk of
      dL/dW and of the decoded W at once), and ``decode_rows`` applies.
    - Optional uniform grid for quantization-aware training: ``grid(encoded)`` returns
      ``(bits, signed, group)`` (``group`` None: one step per row; the steps are the field
      ``scale``, the offsets ``minimum`` when unsigned) and ``pack(encoded, codes, step, offset)``
      writes codes of shape (rows, groups, group) with steps/offsets of shape (rows, groups, 1)
      into a payload; ``step_dtype`` is the storage type of steps and offsets.
    """

    fields: ClassVar[tuple[str, ...]] = ()
    step_dtype: ClassVar[str] = "float32"
    row_wise: ClassVar[bool] = False
    linear = None

    def grid(self, encoded: Encoded) -> tuple[int, bool, int | None] | None:
        return None

    @abc.abstractmethod
    def params(self, encoded: Encoded) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def decode(self, encoded: Encoded, params: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    @abc.abstractmethod
    def write(self, encoded: Encoded, params: Mapping[str, Any]) -> Encoded: ...

    def pack(self, encoded: Encoded, codes: np.ndarray, step: np.ndarray, offset: np.ndarray | None) -> Encoded:
        """Codes on the form's ``grid`` -> a valid Encoded; forms that declare a grid override it."""
        raise RBEError(f"{encoded.codec.codec_id}: its training form declares no uniform grid to pack")


def sin_cycle(t: torch.Tensor, order) -> torch.Tensor:
    """``sin⁽ᵈ⁾(t) = sin(t + d·π/2)`` read from the Z/4 cycle (sin, cos, −sin, −cos); ``order`` is an
    int or an integer tensor broadcastable to ``t`` (only its low 2 bits matter)."""
    d = torch.as_tensor(order, device=t.device) % 4
    base = torch.where(d % 2 == 0, torch.sin(t), torch.cos(t))
    return torch.where(d >= 2, -base, base)


class PhaseForm(TorchForm):
    """A form whose weights are sums of products of factors read through the sin derivative
    cycle (seed 002)::

        v = Σ_terms coef · Π_k sin⁽ᵈᵏ⁾(arg_k),        W = place(v)

    ``terms(encoded, params)`` returns ``[(coef, [(order, arg), ...]), ...]``: ``coef`` and each
    ``arg`` are cheap (affine or product) torch functions of ``params``, broadcastable to ``v``;
    ``order`` is the factor's 2-bit derivative counter (int tensor). ``place`` maps ``v`` to the
    (rows, cols) weight and ``gather`` is its adjoint (dL/dW -> dL/dv). The ``cyclic`` engine
    differentiates the factors from the cycle (d/dt sin⁽ᵈ⁾ = sin⁽ᵈ⁺¹⁾) instead of through autograd.
    """

    @abc.abstractmethod
    def terms(self, encoded: Encoded, params: Mapping[str, torch.Tensor]) -> list: ...

    @abc.abstractmethod
    def place(self, encoded: Encoded, v: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def gather(self, encoded: Encoded, grad_w: torch.Tensor) -> torch.Tensor: ...

    def decode(self, encoded: Encoded, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = 0
        for coef, factors in self.terms(encoded, params):
            v = coef
            for order, arg in factors:
                v = v * sin_cycle(arg, order)
            total = total + v
        return self.place(encoded, total)


def as_numpy(value) -> np.ndarray:
    """float64 numpy view of a numpy array or torch tensor (detached, on the CPU)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)
