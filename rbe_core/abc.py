"""The four interfaces plugins implement: Codec, Backend, DerivativeEngine, Quantizer.

Everything here is small on purpose; behaviour lives in plugins (``rbe_plugins``) and backends
(``rbe_backends``). Contracts are stated in the docstrings and checked by the shared test suite.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import numpy as np

from .arrays import like, matrix_shape, to_numpy_f32
from .errors import NativeUnavailableError, RBEFormatError
from .native.lowering import lower


def payload_digest(config: dict, shape: tuple[int, ...], dtype: str, payload: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the codec config, logical shape and dtype, and every payload array (sorted by name)."""
    h = hashlib.sha256()
    h.update(json.dumps([config, list(shape), dtype], sort_keys=True).encode())
    for field in sorted(payload):
        arr = np.ascontiguousarray(payload[field])
        h.update(json.dumps([field, arr.dtype.str, list(arr.shape)]).encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


@attrs.define(frozen=True, slots=False, eq=False)
class Encoded:
    """One encoded tensor: the codec that made it, the logical shape, and its payload arrays.

    ``decode()`` returns a float32 numpy array of ``shape`` (the source's own layout).
    ``bits_per_weight`` counts every stored bit: payload arrays plus this tensor's header entry
    in the .rbe container, divided by the number of logical weights.
    """

    codec: Codec
    shape: tuple[int, ...] = attrs.field(converter=lambda s: tuple(int(d) for d in s))
    payload: Mapping[str, np.ndarray]
    dtype: str = "float32"
    source: str = ""

    def decode(self) -> np.ndarray:
        return self.codec.decode(self)

    def decode_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the 2-D (rows, cols) view, float32."""
        return self.codec.decode_rows(self, start, stop)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.shape)

    @property
    def payload_nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.payload.values())

    @functools.cached_property
    def checksum(self) -> str:
        return payload_digest(self.codec.get_config(), self.shape, self.dtype, self.payload)

    def header(self, plugin: str | None = None) -> dict[str, Any]:
        """The JSON entry the container stores for this tensor."""
        return {
            "codec": self.codec.get_config(),
            "plugin": plugin,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "source": self.source,
            "fields": sorted(self.payload),
            "sha256": self.checksum,
        }

    @property
    def nbytes(self) -> int:
        """Stored bytes: payload plus this tensor's JSON header entry."""
        return self.payload_nbytes + len(json.dumps(self.header()))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel


class Codec(abc.ABC):
    """One bit layout. Subclasses are attrs classes whose fields are their JSON config.

    Contract:
    - ``codec_id`` is stable forever; ``get_config()`` is JSON-serialisable and
      ``type(c).from_config(c.get_config())`` reproduces the codec.
    - ``encode(weight)`` accepts numpy arrays or torch tensors (any float dtype, any strides) and
      raises ``InvalidWeightError`` for NaN/inf, empty or unsupported input.
    - ``decode(encoded)`` returns float32 of ``encoded.shape``; decoding is deterministic, so golden
      files decode bit-exactly across versions.
    - ``validate(encoded)`` raises ``RBEFormatError`` when a payload (e.g. read from a hostile
      file) is inconsistent with the shape and config, so ``decode`` never crashes on it.
    """

    codec_id: ClassVar[str]

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, **attrs.asdict(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Codec:
        params = {k: v for k, v in config.items() if k != "id"}
        return cls(**params)

    @abc.abstractmethod
    def encode(self, weight, *, calibration=None, source: str = "") -> Encoded:
        """Encode ``weight``; ``calibration`` is optional input activations (n, cols) for codecs that use them."""

    @abc.abstractmethod
    def decode(self, encoded: Encoded) -> np.ndarray:
        """Decode the whole tensor to float32 of ``encoded.shape``."""

    @abc.abstractmethod
    def validate(self, encoded: Encoded) -> None:
        """Raise ``RBEFormatError`` unless the payload is consistent with shape and config."""

    def decode_rows(self, encoded: Encoded, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the (rows, cols) view. Override to avoid decoding the whole tensor."""
        return self.decode(encoded).reshape(encoded.matrix_shape)[start:stop]

    def bits_per_weight(self, encoded: Encoded) -> float:
        return encoded.bits_per_weight

    def lower(self, encoded: Encoded):
        """Optional: ``encoded`` in a canonical layout (``rbe_core.native.Lowered``), exactly equal
        to ``decode``, so every backend's native kernels run it (the cffi engine, the torch
        CPU/CUDA kernels); ``None`` (the default) when the codec has none, and backends use a
        registered kernel or the generic ``decode_rows`` path (docs/writing-a-codec-plugin.md)."""
        return None

    def from_lowered(self, encoded: Encoded, lowered) -> Encoded:
        """Optional, the inverse of ``lower``: a valid ``Encoded`` of this codec (same shape,
        dtype and source as ``encoded``) holding ``lowered``'s codes and continuous parameters
        (``step``, ``offset``, ``levels``) rounded to their storage types. Raise ``ValueError``
        for values it cannot store (a code outside its table, a changed fixed level table).
        A codec with ``lower`` and ``from_lowered`` trains (``rbe finetune``, with or without a
        quantizer) and takes calibrated (GPTQ) rounding with no more code. Default: not supported."""
        raise NotImplementedError(f"codec {self.codec_id!r} does not implement from_lowered")

    #: Lowered fields training may change, of ``step``, ``offset``, ``levels`` (those the codec
    #: stores with ``from_lowered``; a fixed level table is not listed).
    trainable_lowered: ClassVar[tuple[str, ...]] = ("step", "offset")

    def bit_settings(self) -> list[Codec]:
        """The variants of this codec a ``--target-bpw`` budget chooses between per tensor (e.g.
        the same codec at several bit widths, best quality first). Default: none (the codec
        cannot be budgeted)."""
        return []

    def torch_form(self):
        """Optional, for training: a ``rbe_core.training.TorchForm`` giving this codec's continuous
        parameters, a differentiable torch decode of them and how to write them back. ``None`` (the
        default): training uses the form derived from the lowered layout when the codec implements
        ``lower`` and ``from_lowered`` (``rbe_core.training.LoweredForm``), else the codec does not
        train in the compressed domain (see docs/training.md)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.get_config())})"


def _codec_class(codec: Codec | type[Codec]) -> type[Codec]:
    return codec if isinstance(codec, type) else type(codec)


def lowers(codec: Codec | type[Codec]) -> bool:
    """True when the codec (instance or class) implements ``lower`` (its tensors may run on
    native kernels)."""
    return _codec_class(codec).lower is not Codec.lower


def lifts(codec: Codec | type[Codec]) -> bool:
    """True when the codec (instance or class) implements both ``lower`` and ``from_lowered``
    (it trains and takes calibrated rounding through its lowered layout)."""
    return lowers(codec) and _codec_class(codec).from_lowered is not Codec.from_lowered


def check_payload(encoded: Encoded, expected: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """Raise ``RBEFormatError`` unless ``encoded.payload`` has exactly ``expected`` {field: (shape, dtype)}."""
    got = set(encoded.payload)
    if got != set(expected):
        raise RBEFormatError(f"{encoded.codec.codec_id}: payload fields {sorted(got)} != {sorted(expected)}")
    for field, (shape, dtype) in expected.items():
        arr = encoded.payload[field]
        if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
            raise RBEFormatError(
                f"{encoded.codec.codec_id}: field {field!r} is {arr.dtype}{list(arr.shape)}, "
                f"expected {np.dtype(dtype)}{list(shape)} for shape {list(encoded.shape)}"
            )


class Kernel(abc.ABC):
    """A plugin's own implementation of one codec's matrix products on named backends, for
    layouts that do not lower (vector or trellis codes...). Register instances' classes with the
    ``rbe_register_kernels`` hook; a backend named in ``backends`` then runs the codec through
    it instead of its lowered or generic path.

    Contract: ``linear(x, encoded, bias)`` and ``linear_grad_input(grad_out, encoded)`` have
    exactly the semantics of ``Backend.linear``/``Backend.linear_grad_input`` (numpy or torch in,
    the same kind, device and dtype out; ``rbe_core.arrays.like`` helps), on the backends named;
    ``accepts(encoded)`` may decline a tensor (default: all), which then takes the backend's path.
    """

    codec_id: ClassVar[str]
    backends: ClassVar[tuple[str, ...]]

    def accepts(self, encoded: Encoded) -> bool:
        return True

    @abc.abstractmethod
    def linear(self, x, encoded: Encoded, bias=None): ...

    @abc.abstractmethod
    def linear_grad_input(self, grad_out, encoded: Encoded): ...


class Backend(abc.ABC):
    """A compute backend: decode, fused linear and the backward op for every codec.

    Contract:
    - ``availability()`` says whether it can run here and, if not, why (never raises).
    - ``linear(x, encoded, bias)`` computes ``x @ W.T + bias`` for W = decode(encoded) viewed as
      (out_features, in_features) without materialising the whole float32 W; ``x`` is numpy or
      torch and the result is the same kind (device and dtype kept).
    - ``linear_grad_input(grad_out, encoded)`` computes ``grad_out @ W`` the same way.
    - Which path runs a tensor (``path(encoded)``): a plugin ``Kernel`` registered for this
      backend and codec ("kernel"), else the backend's native kernels on the codec's lowered
      layout ("native"), else the generic row-chunked ``Codec.decode_rows`` path ("generic": an
      explicit, documented fallback, logged once per codec).
    """

    name: ClassVar[str]
    priority: ClassVar[int] = 0
    #: The plugin kernels registered for this backend, codec id -> ``Kernel``; the registry
    #: hands each backend it builds its table (``rbe_core.registry.get_backend``).
    kernels: Mapping[str, Kernel] = {}

    @classmethod
    @abc.abstractmethod
    def availability(cls) -> tuple[bool, str]:
        """(True, '') when usable here, else (False, reason)."""

    @classmethod
    def features(cls) -> tuple[str, ...]:
        """Compiled or detected features (e.g. 'avx2', 'cuda'); informational."""
        return ()

    def kernel_for(self, encoded: Encoded) -> Kernel | None:
        """The plugin kernel registered for this backend and ``encoded``'s codec, if it accepts it."""
        kernel = self.kernels.get(encoded.codec.codec_id)
        return kernel if kernel is not None and kernel.accepts(encoded) else None

    def path(self, encoded: Encoded) -> str:
        """"kernel", "native" or "generic": how this backend runs ``encoded`` (see the class)."""
        if self.kernel_for(encoded) is not None:
            return "kernel"
        return "native" if self.runs_lowered() and lower(encoded) is not None else "generic"

    @classmethod
    def runs_lowered(cls) -> bool:
        """True when this backend has native kernels for the canonical lowered layouts."""
        return True

    def supports(self, codec: Codec | type[Codec]) -> bool:
        """True when this backend runs ``codec``'s tensors (a codec or its class) without the
        generic path: a kernel is registered for it, or its class lowers (``Codec.lower``)."""
        return codec.codec_id in self.kernels or (self.runs_lowered() and lowers(codec))

    def native_decoder(self, plan, tensors: Mapping[str, Encoded]):
        """A native engine running a whole causal LM (``plan``: ``rbe_core.models.NativePlan``;
        ``tensors``: name -> Encoded) with ``forward(ids, pos, all_logits=False)``, ``length``,
        ``profile()``; raises ``NativeUnavailableError`` saying why not (the default: none)."""
        raise NativeUnavailableError(f"backend {self.name!r} has no native engine")

    def linear(self, x, encoded: Encoded, bias=None):
        """``x @ W.T + bias``, same array kind as ``x`` (a plugin kernel first, see the class)."""
        kernel = self.kernel_for(encoded)
        if kernel is not None:
            return kernel.linear(x, encoded, bias)
        return self.own_linear(x, encoded, bias)

    def linear_grad_input(self, grad_out, encoded: Encoded):
        """``grad_out @ W``, same array kind as ``grad_out``."""
        kernel = self.kernel_for(encoded)
        if kernel is not None:
            return kernel.linear_grad_input(grad_out, encoded)
        return self.own_linear_grad_input(grad_out, encoded)

    @abc.abstractmethod
    def decode(self, encoded: Encoded):
        """The whole decoded weight in this backend's array kind."""

    @abc.abstractmethod
    def own_linear(self, x, encoded: Encoded, bias=None):
        """``linear`` on the backend's own paths (native on the lowered layout, else generic)."""

    @abc.abstractmethod
    def own_linear_grad_input(self, grad_out, encoded: Encoded):
        """``linear_grad_input`` on the backend's own paths."""


class NumpyKernelBackend(Backend):
    """Helper base for CPU backends whose kernels take and return numpy float32 arrays."""

    def decode(self, encoded: Encoded) -> np.ndarray:
        return encoded.decode()

    def own_linear(self, x, encoded: Encoded, bias=None):
        out = self.linear_np(_as_rows(x, encoded.matrix_shape[1]), encoded)
        if bias is not None:
            out += to_numpy_f32(bias)
        return like(out.reshape(*x.shape[:-1], encoded.matrix_shape[0]), x)

    def own_linear_grad_input(self, grad_out, encoded: Encoded):
        out = self.grad_input_np(_as_rows(grad_out, encoded.matrix_shape[0]), encoded)
        return like(out.reshape(*grad_out.shape[:-1], encoded.matrix_shape[1]), grad_out)

    @abc.abstractmethod
    def linear_np(self, x: np.ndarray, encoded: Encoded) -> np.ndarray:
        """(n, in) float32 -> (n, out) float32."""

    @abc.abstractmethod
    def grad_input_np(self, grad_out: np.ndarray, encoded: Encoded) -> np.ndarray:
        """(n, out) float32 -> (n, in) float32."""


def _as_rows(x, width: int) -> np.ndarray:
    if x.shape[-1] != width:
        raise ValueError(f"input's last dimension is {x.shape[-1]}, the weight expects {width}")
    return to_numpy_f32(x).reshape(-1, width)


class DerivativeEngine(abc.ABC):
    """Computes gradients from codes.

    Contract: ``backward(encoded, x, grad_out)`` returns ``(grad_input, grads)`` where
    ``grad_input = grad_out @ W`` and ``grads`` maps each continuous payload field of the codec to
    d(loss)/d(field), equal (to float tolerance) to the reference ``autograd`` engine.
    Implementations may take keyword options (``params``, ``backend``, ``transposed``: see
    ``rbe_plugins.torch_engines``); the three positional arguments alone must always work.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def backward(self, encoded: Encoded, x, grad_out) -> tuple[Any, dict[str, Any]]: ...


class Quantizer(abc.ABC):
    """Maps continuous codec parameters to bit fields and back, with a differentiable path.

    Contract: ``quantize(values)`` returns integer codes that fit ``bits``; ``dequantize(codes)``
    maps them back; ``fake_quantize(values)`` (torch) equals ``dequantize(quantize(values))`` in the
    forward pass and carries a gradient (straight-through or learned step size) in the backward.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def quantize(self, values): ...

    @abc.abstractmethod
    def dequantize(self, codes): ...

    @abc.abstractmethod
    def fake_quantize(self, values): ...


class Geometry(abc.ABC):
    """A model of hyperbolic space seen as a radial basis function with a trigonometric phase.

    Contract: ``radial(r, order)`` is the ``order``-th derivative of the geometry's radial function
    (float64 in, float64 out, exact closed form or an exact derivative cycle);
    ``angular(theta, order)`` is the ``order``-th derivative of ``sin`` (the Z/4 cycle
    sin -> cos -> -sin -> -cos); ``basis(r, theta)`` is the pair ``f(r)·cos θ, f(r)·sin θ``.
    ``cycle`` is the period of the radial derivative cycle, or ``None`` when none exists.
    """

    name: ClassVar[str]
    cycle: ClassVar[int | None] = None

    @abc.abstractmethod
    def radial(self, r, order: int = 0) -> np.ndarray:
        """d^order/dr^order of the radial function at ``r``."""

    @staticmethod
    def angular(theta, order: int = 0) -> np.ndarray:
        """d^order/dθ^order sin θ, read from the Z/4 cycle (sin, cos, -sin, -cos)."""
        theta = np.asarray(theta, dtype=np.float64)
        k = int(order) % 4
        value = np.sin(theta) if k % 2 == 0 else np.cos(theta)
        return value if k < 2 else -value

    def basis(self, r, theta) -> tuple[np.ndarray, np.ndarray]:
        """``(f(r)·cos θ, f(r)·sin θ)``: the point's two phase components."""
        f = self.radial(r)
        return f * self.angular(theta, 1), f * self.angular(theta, 0)
