"""Reference kernels in numpy, for every codec, never the whole float32 weight at once.

A codec that lowers runs on its canonical layout (``Lowered.linear``/``grad_input``: the input
rotated once, then row chunks of ``W_c`` from the level table); any other codec on the generic
row-chunked path (``rbe_core.native.generic``).
"""

from __future__ import annotations

import numpy as np

from rbe_core.abc import Encoded
from rbe_core.native import generic, lower


def linear(x: np.ndarray, encoded: Encoded) -> np.ndarray:
    """(n, in) @ W.T -> (n, out)."""
    low = lower(encoded)
    return low.linear(x) if low is not None else generic.linear(x, encoded, "numpy")


def grad_input(grad_out: np.ndarray, encoded: Encoded) -> np.ndarray:
    """(n, out) @ W -> (n, in)."""
    low = lower(encoded)
    return low.grad_input(grad_out) if low is not None else generic.grad_input(grad_out, encoded, "numpy")
