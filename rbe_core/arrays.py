"""Conversions between the array kinds rbe accepts (numpy arrays and torch tensors)."""

from __future__ import annotations

import math

import numpy as np

from .errors import InvalidWeightError

_FLOAT_KINDS = ("float16", "float32", "float64", "bfloat16")


def is_torch(x) -> bool:
    """True when ``x`` is a torch tensor (without importing torch when it is not loaded)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def to_numpy_f32(x) -> np.ndarray:
    """A C-contiguous float32 numpy copy/view of a numpy array or torch tensor (any device)."""
    if is_torch(x):
        x = x.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def like(result: np.ndarray, template):
    """Return numpy ``result`` as the same kind (numpy or torch, device, float dtype) as ``template``."""
    if is_torch(template):
        import torch

        return torch.from_numpy(np.ascontiguousarray(result)).to(template.device, template.dtype)
    return result


def dtype_name(x) -> str:
    """The element type of a numpy array or torch tensor as a plain string ('float32', 'bfloat16')."""
    return str(x.dtype).removeprefix("torch.")


def as_weight(weight, *, min_ndim: int = 1) -> tuple[np.ndarray, str]:
    """Validate a weight for encoding and return (float32 C-contiguous array, source dtype name).

    Accepts numpy arrays and torch tensors of float16/bfloat16/float32/float64, any strides.
    Raises ``InvalidWeightError`` for non-float dtypes, too few dimensions, empty or non-finite input.
    """
    if not (isinstance(weight, np.ndarray) or is_torch(weight)):
        raise InvalidWeightError(f"expected a numpy array or torch tensor, got {type(weight).__name__}")
    source = dtype_name(weight)
    if source not in _FLOAT_KINDS:
        raise InvalidWeightError(f"weights must be floating point, got dtype {source}")
    if weight.ndim < min_ndim:
        raise InvalidWeightError(f"expected at least {min_ndim} dimension(s), got shape {tuple(weight.shape)}")
    array = to_numpy_f32(weight)
    if array.size == 0:
        raise InvalidWeightError(f"cannot encode an empty tensor of shape {array.shape}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InvalidWeightError(f"weight contains {bad} NaN/inf value(s); clean it before encoding")
    return array, source


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the 2-D view every codec works on: rows = shape[0], cols = the rest."""
    if len(shape) == 0:
        return 1, 1
    return int(shape[0]), int(math.prod(shape[1:]))


#: Largest decoded weight slab (in elements) a fused path materialises at once: 1 Mi floats = 4 MiB.
CHUNK_ELEMENTS = 1 << 20


def row_chunks(rows: int, cols: int, budget: int = CHUNK_ELEMENTS):
    """Yield (start, stop) row ranges whose decoded size stays within ``budget`` elements."""
    step = max(1, budget // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)
