"""Quality report of an encoded tensor against its original."""

from __future__ import annotations

import math

import numpy as np

from ..abc import Encoded
from ..arrays import to_numpy_f32


def report(encoded: Encoded, original) -> dict[str, float]:
    """Bits per weight (everything stored), relative RMSE, SNR in dB and max abs error.

    ``original`` is the array that was encoded (numpy or torch); errors are computed in float64.
    """
    ref = to_numpy_f32(original).astype(np.float64).reshape(encoded.shape)
    err = encoded.decode().astype(np.float64) - ref
    signal = float(np.sqrt(np.mean(ref**2)))
    rmse = float(np.sqrt(np.mean(err**2)))
    rel = rmse / signal if signal > 0 else (0.0 if rmse == 0 else math.inf)
    return {
        "bits_per_weight": encoded.bits_per_weight,
        "relative_rmse": rel,
        "snr_db": -20.0 * math.log10(rel) if rel > 0 else math.inf,
        "max_abs_error": float(np.abs(err).max()) if err.size else 0.0,
    }
