"""The derivative engines ``autograd`` and ``cyclic`` (``rbe_core.DerivativeEngine``), in torch;
``rbe_plugins.engines`` registers them and loads this module on their first use.

Both compute, for ``y = x @ W.T`` (``x @ W`` when ``transposed``) with W the decode of ``encoded``:

- ``grad_input`` from the codes through the backend (``linear_grad_input``, or ``linear`` when
  transposed): the fused path, no whole float32 W;
- the gradient of every continuous parameter of the codec's ``TorchForm`` (``rbe_core.training.trainable``),
  from ``dL/dW = grad_outᵀ x``. For ``row_wise`` forms this runs a chunk of rows at a time
  (``CHUNK_ELEMENTS`` weights): the rows' block of dL/dW, the form's decode of those rows only
  and its vector-Jacobian product, so at most one chunk of dL/dW and of the decoded W exists at
  once (a matrix that fits in one chunk is done whole).

``backward(encoded, x, grad_out, *, params=None, backend=None, transposed=False)``: ``params``
(``{field: array}``) overrides the values read from ``encoded`` (the gradient is taken there);
``backend`` defaults to ``rbe_core.get_backend()``. Gradients come back as torch tensors in
``grad_out``'s dtype, so float64 inputs give float64 gradients (``torch.autograd.gradcheck``).
``param_grads(encoded, grad_w, params=None)`` is the parameter half alone, for callers that have
``dL/dW`` already (embeddings).

- ``autograd`` (the reference): differentiates the form's torch ``decode`` with torch autograd.
- ``cyclic`` (seed 002): for ``PhaseForm`` codecs, the derivative of each factor ``sin⁽ᵈ⁾(t)`` is
  read from the same Z/4 table with the 2-bit order counter advanced by one (a quarter-turn phase
  shift), ``d/dt sin⁽ᵈ⁾ = sin⁽ᵈ⁺¹⁾``, and the product rule combines factors; autograd only carries
  the affine bookkeeping from parameters to factor arguments (ω·i + ψ, scale·amplitude).
"""

from __future__ import annotations

import abc

import torch

from rbe_core import DerivativeEngine, Encoded, arrays
from rbe_core.arrays import row_chunks
from rbe_core.errors import RBEError
from rbe_core.registry import get_backend
from rbe_core.training.forms import PhaseForm, TorchForm, sin_cycle
from rbe_core.training.trainable import row_encoded, torch_form

#: Weights per row chunk of the parameter-gradient pass (``row_wise`` forms): the backends'
#: decode budget (4 MiB of float32). Fewer, larger chunks mean fewer parallel torch ops per step,
#: which matters more than cache fit when other processes compete for the cores.
CHUNK_ELEMENTS = arrays.CHUNK_ELEMENTS


def _torch(value, like: torch.Tensor | None = None) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return t if like is None else t.to(like.device, like.dtype)


def weight_grad(x: torch.Tensor, grad_out: torch.Tensor, transposed: bool = False,
                rows: slice = slice(None)) -> torch.Tensor:
    """Rows ``rows`` of dL/dW in W's stored (rows, cols) layout, for y = x @ W.T (or x @ W when
    ``transposed``)."""
    x2 = x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    return x2[:, rows].T @ g2 if transposed else g2[:, rows].T @ x2


def _leaves(form: TorchForm, encoded: Encoded, params, like: torch.Tensor) -> dict[str, torch.Tensor]:
    values = form.params(encoded) if params is None else params
    return {f: _torch(values[f], like).detach().clone().requires_grad_() for f in form.fields if f in values}


class _FormEngine(DerivativeEngine):
    def backward(self, encoded, x, grad_out, *, params=None, backend=None, transposed=False):
        backend = backend or get_backend()
        grad_out = _torch(grad_out).contiguous()
        x = _torch(x)
        op = backend.linear if transposed else backend.linear_grad_input
        grad_input = op(grad_out, encoded)
        return grad_input, self._chunked_param_grads(encoded, x, grad_out, params, transposed)

    def _chunked_param_grads(self, encoded, x, grad_out, params, transposed) -> dict[str, torch.Tensor]:
        """``param_grads`` for ``dL/dW = grad_outᵀ x``, a row chunk at a time for ``row_wise`` forms."""
        rows, cols = encoded.matrix_shape
        # see ``row_encoded``: every payload array stored row by row
        row_wise = torch_form(encoded.codec).row_wise and row_encoded(encoded, slice(0, 0)) is not None
        chunks = list(row_chunks(rows, cols, CHUNK_ELEMENTS)) if row_wise else []
        if len(chunks) < 2:
            return self.param_grads(encoded, weight_grad(x, grad_out, transposed), params)
        out: dict[str, torch.Tensor] = {}
        for start, stop in chunks:
            part = slice(start, stop)
            sub_params = None if params is None else {f: v[part] for f, v in params.items()}
            got = self.param_grads(row_encoded(encoded, part), weight_grad(x, grad_out, transposed, part), sub_params)
            for field, grad in got.items():
                if field not in out:
                    out[field] = grad.new_empty((rows, *grad.shape[1:]))
                out[field][part] = grad
        return out

    @abc.abstractmethod
    def param_grads(self, encoded: Encoded, grad_w: torch.Tensor, params=None) -> dict[str, torch.Tensor]:
        """``{field: dL/dfield}`` given ``grad_w = dL/dW`` (rows, cols)."""


def _grads(outputs, leaves: dict[str, torch.Tensor], seeds) -> dict[str, torch.Tensor]:
    got = torch.autograd.grad(outputs, list(leaves.values()), seeds, allow_unused=True)
    return {f: torch.zeros_like(t) if g is None else g for (f, t), g in zip(leaves.items(), got, strict=True)}


class AutogradEngine(_FormEngine):
    """The reference: torch autograd through the codec's torch decode."""

    name = "autograd"

    def param_grads(self, encoded, grad_w, params=None):
        form = torch_form(encoded.codec)
        leaves = _leaves(form, encoded, params, grad_w)
        with torch.enable_grad():
            w = form.decode(encoded, leaves)
            return _grads([w], leaves, [grad_w.to(w.dtype)])


class CyclicEngine(_FormEngine):
    """Seed 002's table engine: factor derivatives from the 2-bit derivative-order counter."""

    name = "cyclic"

    def param_grads(self, encoded, grad_w, params=None):
        form = torch_form(encoded.codec)
        if not isinstance(form, PhaseForm):
            raise RBEError(f"the cyclic engine needs a codec built from phase factors (a PhaseForm); "
                           f"{encoded.codec.codec_id!r} is not one; use the 'autograd' engine")
        leaves = _leaves(form, encoded, params, grad_w)
        outputs, seeds = [], []
        with torch.enable_grad():
            terms = form.terms(encoded, leaves)
            gv = form.gather(encoded, grad_w)
            for coef, factors in terms:
                with torch.no_grad():
                    values = [sin_cycle(arg, order) for order, arg in factors]
                    slopes = [sin_cycle(arg, order + 1) for order, arg in factors]  # d/dt: counter + 1
                    c = coef.detach()
                outputs.append(coef)
                seeds.append((gv * _product(values, gv)).sum_to_size(coef.shape))
                for k, (_, arg) in enumerate(factors):
                    others = _product(values[:k] + values[k + 1:], gv)
                    outputs.append(arg)
                    seeds.append((gv * c * slopes[k] * others).sum_to_size(arg.shape))
            return _grads(outputs, leaves, seeds)


def _product(tensors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    out = torch.ones((), dtype=like.dtype, device=like.device)
    for t in tensors:
        out = out * t
    return out
