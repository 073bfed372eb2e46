"""Training in the compressed domain (issue 7).

Two ways to train a model whose linear layers are ``RBELinear``:

- **codec parameters** (``prepare_for_training(model)``): each layer's continuous codec parameters
  (int8 row scales, int4 group scales and minima, ...) become torch Parameters. The forward runs
  the backend's fused kernel on the codes *as stored* (parameters written back and rounded to
  their storage type), the backward takes ``grad_input`` from the codes through the backend and
  the parameter gradients from a ``DerivativeEngine`` (``autograd`` or ``cyclic``); the gradient
  reaches the float32 shadow parameter straight through the storage rounding.
- **quantization-aware** (``prepare_for_training(model, quantizer="lsq")``): each layer keeps a
  float32 shadow weight; the forward sees ``quantizer.fake_quantize(shadow)`` on the codec's grid.

Embeddings (``RBEEmbedding``) whose codec has a torch form become ``TrainableRBEEmbedding`` (codec
parameters only, no quantizer): a lookup decodes only the requested rows from the trainable
parameters with the form's torch ``decode`` on a row slice of the codes, and the parameter
gradients come from torch autograd through that restricted decode (not from an engine: an
embedding has no matmul whose ``grad_input`` an engine would fuse). An embedding sharing its codes
with a linear layer (tied head) is left as it is; the linear layer trains those codes.

Either way ``finalize(model)`` writes the trained values back into valid ``Encoded`` tensors, puts
plain ``RBELinear`` (``RBEEmbedding``) layers back and returns ``{layer name: Encoded}`` for ``rbe_core.save``.

A codec takes part by returning a :class:`TorchForm` (``rbe_core.training.forms``) from
``Codec.torch_form()`` (the built-in codecs keep theirs in ``rbe_plugins.torch_forms``), or, with
none, through its lowered layout (``rbe_core.training.lowered``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..abc import Backend, Codec, DerivativeEngine, Encoded, Quantizer, lifts
from ..errors import RBEError
from ..layers import RBEEmbedding, RBELinear, set_module
from ..registry import registry
from .forms import TorchForm, as_numpy
from .lowered import LoweredForm


def torch_form(codec: Codec) -> TorchForm:
    """The codec's training form: its own (``Codec.torch_form``), else the one derived from its
    lowered layout when it lowers and lifts (``LoweredForm``); raises ``RBEError`` naming the
    codec when it has neither."""
    form = codec.torch_form()
    if form is None and lifts(codec):
        form = LoweredForm(codec)
    if form is None:
        raise RBEError(f"codec {codec.codec_id!r} has no torch form (Codec.torch_form); it cannot be trained "
                       "in the compressed domain; use a quantizer (quantization-aware training) instead")
    return form


def _lookup(kind: str, name: str):
    entry = registry().lookup(kind, name)
    if entry is None:
        known = ", ".join(sorted(registry().entries[kind])) or "none"
        raise RBEError(f"unknown {kind[:-1]} {name!r}; registered: {known}")
    return entry.obj


def get_engine(name: str = "autograd") -> DerivativeEngine:
    """A derivative engine instance by registered name."""
    return _lookup("engines", name)()


def get_quantizer(name: str, **kwargs) -> Quantizer:
    """A quantizer instance by registered name (``kwargs`` go to its constructor)."""
    return _lookup("quantizers", name)(**kwargs)


class _EngineLinear(torch.autograd.Function):
    """y = x @ W.T + b (x @ W + b when transposed) from the stored codes; backward via the engine."""

    @staticmethod
    def forward(ctx, x, bias, layer, *params):
        encoded = layer.encoded
        ctx.layer, ctx.encoded = layer, encoded
        ctx.save_for_backward(x)
        if layer.transposed:
            out = layer.backend.linear_grad_input(x, encoded)
            return out if bias is None else out + bias.to(out.dtype)
        return layer.backend.linear(x, encoded, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        grad_out = grad_out.contiguous()
        grad_input, grads = layer.engine.backward(ctx.encoded, x, grad_out, backend=layer.backend,
                                                  transposed=layer.transposed)
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        param_grads = [grads[f].to(p.dtype).reshape(p.shape) for f, p in zip(layer.fields, layer.shadow, strict=True)]
        return (grad_input if ctx.needs_input_grad[0] else None, grad_bias, None, *param_grads)


class _ShadowEncoded:
    """Mixin: ``encoded`` = the base tensor with the current shadow parameters written back
    (cached until a shadow parameter changes). Needs ``form``, ``fields``, ``shadow``, ``_base``,
    ``_cache``."""

    @property
    def encoded(self) -> Encoded:
        key = tuple(p._version for p in self.shadow) + tuple(p.data_ptr() for p in self.shadow)
        if self._cache is None or self._cache[0] != key:
            written = self.form.write(self._base, dict(zip(self.fields, self.shadow, strict=True)))
            self._cache = (key, written)
        return self._cache[1]


class TrainableRBELinear(_ShadowEncoded, nn.Module):
    """An ``RBELinear`` whose codec parameters are trainable (see the module docstring).

    ``shadow`` holds one float32 Parameter per field of the codec's torch form; ``encoded`` is the
    layer's current codes (rewritten from the shadow when it changed).
    """

    def __init__(self, layer: RBELinear, engine: str | DerivativeEngine = "autograd", backend: Backend | None = None):
        super().__init__()
        self.form = torch_form(layer.encoded.codec)
        self.engine = get_engine(engine) if isinstance(engine, str) else engine
        self.backend = backend or layer.backend
        self.transposed = layer.transposed
        self.in_features, self.out_features = layer.in_features, layer.out_features
        values = self.form.params(layer.encoded)
        self.fields = tuple(f for f in self.form.fields if f in values)
        self.bias = layer.bias
        self.shadow = nn.ParameterList(
            [nn.Parameter(torch.from_numpy(values[f]).float()) for f in self.fields])
        self._base = layer.encoded
        self._cache: tuple[tuple[int, ...], Encoded] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form.linear is not None:  # the form's own differentiable fused path (see TorchForm)
            out = self.form.linear(x, self._base, dict(zip(self.fields, self.shadow, strict=True)), self.transposed)
            return out if self.bias is None else out + self.bias
        return _EngineLinear.apply(x, self.bias, self, *self.shadow)

    def finalize(self) -> RBELinear:
        """A plain ``RBELinear`` holding the trained codes."""
        bias = None if self.bias is None else self.bias.detach().clone()
        return RBELinear(self.encoded, bias, self.backend, transposed=self.transposed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"codec={self._base.codec.codec_id}, fields={list(self.fields)}, engine={self.engine.name}")


class QATLinear(nn.Module):
    """Quantization-aware training: a float32 shadow weight seen through ``quantizer.fake_quantize``.

    With a uniform quantizer (``ste``/``lsq``) on a codec with a ``TorchForm.grid`` (int8, int4) the
    quantizer works on exactly the codec's grid, is initialised from the stored steps and offsets
    (so training starts from the compressed model) and ``finalize`` writes its codes and steps
    into the payload. Otherwise (codebook quantizer, or codecs without a grid) the quantizer is
    fitted to the shadow weight and ``finalize`` re-encodes the fake-quantized weight with the
    layer's codec.
    """

    def __init__(self, layer: RBELinear, quantizer: str | Quantizer = "ste", **quantizer_kwargs):
        super().__init__()
        self._base = layer.encoded
        self.backend, self.transposed = layer.backend, layer.transposed
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bias = layer.bias
        rows, cols = self._base.matrix_shape
        form = _qat_form(self._base.codec)
        grid = None if form is None else form.grid(self._base)
        name = quantizer if isinstance(quantizer, str) else quantizer.name
        # uniform quantizers (those with ``steps``) can work on the codec's own grid
        self.on_grid = grid is not None and hasattr(_lookup("quantizers", name), "steps")
        self.form = form if self.on_grid else None
        # a lowered form's grid acts on the basis values W_c (before its input transform)
        self.in_basis = self.on_grid and hasattr(form, "basis")
        start = form.basis(self._base) if self.in_basis else self._base.decode().reshape(rows, cols)
        self.weight = nn.Parameter(torch.from_numpy(np.array(start, dtype=np.float32)))
        if self.on_grid:
            bits, signed, group = grid
            self.group = group or cols
            quantizer_kwargs = {"bits": bits, "signed": signed, "step_dtype": form.step_dtype, **quantizer_kwargs}
            if hasattr(form, "grid_levels"):
                quantizer_kwargs["levels"] = form.grid_levels(self._base)
        else:
            self.group = cols
        self.quantizer = get_quantizer(quantizer, **quantizer_kwargs) if isinstance(quantizer, str) else quantizer
        with torch.no_grad():
            if self.on_grid:
                step, offset = self._grid_steps()
                self.quantizer.steps(torch.from_numpy(step).float().reshape(rows, -1, 1),
                                     None if offset is None else torch.from_numpy(offset).float().reshape(rows, -1, 1))
            else:
                self.quantizer.fit(self._groups(self.weight))
        self.quantizer_params = nn.ParameterList(self.quantizer.parameters())

    def _grid_steps(self) -> tuple[np.ndarray, np.ndarray | None]:
        if hasattr(self.form, "grid_steps"):
            return self.form.grid_steps(self._base)
        params = self.form.params(self._base)
        return params["scale"], params.get("minimum")

    def _groups(self, w: torch.Tensor) -> torch.Tensor:
        rows, cols = w.shape
        pad = -cols % self.group
        return F.pad(w, (0, pad)).reshape(rows, -1, self.group)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward sees, in stored (rows, cols) layout."""
        rows, width = self.weight.shape
        w = self.quantizer.fake_quantize(self._groups(self.weight)).reshape(rows, -1)[:, :width]
        return self.form.from_basis(self._base, w) if self.in_basis else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight().to(x.dtype)
        if not self.transposed:
            return F.linear(x, w, self.bias)
        out = x @ w
        return out if self.bias is None else out + self.bias

    def finalize(self) -> RBELinear:
        with torch.no_grad():
            if self.on_grid:
                step, offset = self.quantizer.stored_steps(np.dtype(self.form.step_dtype))
                codes = self.quantizer.quantize(as_numpy(self._groups(self.weight)))
                encoded = self.form.pack(self._base, codes, step, offset)
            else:
                w = self.quantized_weight().reshape(self._base.shape)
                encoded = self._base.codec.encode(w, source=self._base.source)
        bias = None if self.bias is None else self.bias.detach().clone()
        return RBELinear(encoded, bias, self.backend, transposed=self.transposed)


def row_encoded(encoded: Encoded, rows: np.ndarray | slice) -> Encoded | None:
    """``encoded`` restricted to the matrix rows ``rows`` (an int array, or a slice: payload views,
    no copy), or None when some payload array is not stored row by row (leading axis = matrix rows)."""
    n = encoded.matrix_shape[0]
    if len(encoded.shape) != 2 or any(np.ndim(a) == 0 or a.shape[0] != n for a in encoded.payload.values()):
        return None
    payload = {k: np.ascontiguousarray(a[rows]) for k, a in encoded.payload.items()}
    count = len(range(n)[rows]) if isinstance(rows, slice) else len(rows)
    return Encoded(encoded.codec, (count, encoded.shape[1]), payload, dtype=encoded.dtype, source=encoded.source)


def decode_rows(form: TorchForm, encoded: Encoded, params: Mapping[str, torch.Tensor], rows) -> torch.Tensor:
    """Rows ``rows`` (int array) of ``form.decode(encoded, params)``, decoding only those rows;
    ``params`` are full-size (leading axis = matrix rows) and differentiable. Needs a form whose
    payload and parameters are stored row by row (int8, int4, cyclic8, cyclic16, hadamard)."""
    rows = np.asarray(rows, dtype=np.int64)
    sub = row_encoded(encoded, rows)
    if sub is None:
        raise RBEError(f"{encoded.codec.codec_id}: its codes are not stored row by row")
    index = torch.from_numpy(rows)
    return form.decode(sub, {f: p[index.to(p.device)] for f, p in params.items()})


class TrainableRBEEmbedding(_ShadowEncoded, nn.Module):
    """An ``RBEEmbedding`` whose codec parameters are trainable (see the module docstring).

    The forward sees the parameters as stored (rounded to their storage type, straight through).
    Row-wise codecs decode only the requested rows; codecs stored in blocks (packed64/128) decode
    the whole table through the form (``row_wise`` is False).
    """

    def __init__(self, layer: RBEEmbedding):
        super().__init__()
        self.form = torch_form(layer.encoded.codec)
        self.num_embeddings, self.embedding_dim = layer.num_embeddings, layer.embedding_dim
        values = self.form.params(layer.encoded)
        self.fields = tuple(f for f in self.form.fields if f in values)
        self.shadow = nn.ParameterList(
            [nn.Parameter(torch.from_numpy(values[f]).float()) for f in self.fields])
        self._base = layer.encoded
        self._cache: tuple[tuple[int, ...], Encoded] | None = None
        self.row_wise = self._probe_rows(values)

    def _probe_rows(self, values: Mapping[str, np.ndarray]) -> bool:
        """Whether decoding a row slice of the codes gives those rows (checked on the first and last)."""
        n = self.num_embeddings
        if any(np.ndim(v) == 0 or v.shape[0] != n for v in values.values()):
            return False
        rows = np.unique([0, n - 1])
        try:
            with torch.no_grad():
                got = decode_rows(self.form, self._base, {f: torch.from_numpy(values[f]) for f in self.fields}, rows)
        except Exception:  # noqa: BLE001 - a form that cannot decode a slice is not row-wise
            return False
        want = np.concatenate([self._base.decode_rows(int(r), int(r) + 1) for r in rows])
        tol = 1e-3 * max(1.0, float(np.abs(want).max(initial=0.0)))
        return tuple(got.shape) == want.shape and bool(np.allclose(got.numpy(), want, rtol=1e-3, atol=tol))

    def _stored(self, encoded: Encoded, shadow: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``shadow`` seen at its stored values (those of ``encoded``), gradient straight through."""
        stored = self.form.params(encoded)
        out = {}
        for f, p in zip(self.fields, shadow, strict=True):
            s = torch.from_numpy(np.ascontiguousarray(stored[f])).to(p.device, p.dtype).reshape(p.shape)
            out[f] = p + (s - p).detach()
        return out

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        """The table rows ``rows`` (sorted unique int array), differentiable in the shadow parameters."""
        enc = self.encoded
        if not self.row_wise:
            return self.form.decode(enc, self._stored(enc, list(self.shadow)))[torch.from_numpy(rows)]
        sub = row_encoded(enc, rows)
        index = torch.from_numpy(rows)
        return self.form.decode(sub, self._stored(sub, [p[index.to(p.device)] for p in self.shadow]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        uniq, inverse = torch.unique(flat, return_inverse=True)
        table = self.rows(uniq.numpy().astype(np.int64)).float()
        return table[inverse].reshape(*ids.shape, self.embedding_dim).to(ids.device)

    def finalize(self) -> RBEEmbedding:
        """A plain ``RBEEmbedding`` holding the trained codes."""
        return RBEEmbedding(self.encoded)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"codec={self._base.codec.codec_id}, fields={list(self.fields)}, row_wise={self.row_wise}")


def _form_or_none(codec: Codec) -> TorchForm | None:
    try:
        return torch_form(codec)
    except RBEError:
        return None


def _qat_form(codec: Codec) -> TorchForm | None:
    """The form whose grid quantization-aware training uses: the lowered layout's (the codec's own
    level table and steps) when the codec lowers and lifts, else its training form."""
    if lifts(codec):
        return LoweredForm(codec)
    return _form_or_none(codec)


_TRAINABLE = (TrainableRBELinear, QATLinear, TrainableRBEEmbedding)


def prepare_for_training(model: nn.Module, *, engine: str = "autograd", quantizer: str | None = None,
                         backend: Backend | None = None, embeddings: bool = True, **quantizer_kwargs) -> list[str]:
    """Replace every ``RBELinear`` in ``model`` (in place) by a trainable layer; return their names.

    Without ``quantizer`` the codec parameters train through ``engine`` (``TrainableRBELinear``);
    with one, each layer trains a shadow weight through that quantizer (``QATLinear``). Without
    ``quantizer`` and with ``embeddings``, each ``RBEEmbedding`` whose codec has a torch form and
    whose codes no linear layer shares becomes a ``TrainableRBEEmbedding``. Every other parameter
    of ``model`` is frozen (``requires_grad=False``) except the replaced layers' biases.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    modules = list(model.named_modules())
    tied = {id(m.encoded) for _, m in modules if isinstance(m, RBELinear)}
    for name, module in modules:
        if isinstance(module, RBEEmbedding):
            if (embeddings and quantizer is None and id(module.encoded) not in tied
                    and _form_or_none(module.encoded.codec) is not None):
                set_module(model, name, TrainableRBEEmbedding(module))
                names.append(name)
            continue
        if not isinstance(module, RBELinear):
            continue
        if quantizer is None:
            new = TrainableRBELinear(module, engine, backend)
        else:
            new = QATLinear(module, quantizer, **quantizer_kwargs)
        if new.bias is not None:
            new.bias.requires_grad_(True)
        set_module(model, name, new)
        names.append(name)
    return names


def finalize(model: nn.Module) -> dict[str, Encoded]:
    """Put plain ``RBELinear``/``RBEEmbedding`` layers back (in place); return ``{layer name: trained Encoded}``."""
    out = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, _TRAINABLE):
            layer = module.finalize()
            set_module(model, name, layer)
            out[name] = layer.encoded
    return out
