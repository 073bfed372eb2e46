import math

import numpy as np

import rbe_core


def test_report_on_int8(rng):
    w = rng.standard_normal((64, 128)).astype(np.float32)
    enc = rbe_core.get_codec("int8").encode(w)
    rep = rbe_core.report(enc, w)
    err = enc.decode() - w
    assert rep["relative_rmse"] == np.sqrt(np.mean(err.astype(np.float64) ** 2)) / np.sqrt(np.mean(w.astype(np.float64) ** 2))
    assert rep["snr_db"] == -20 * math.log10(rep["relative_rmse"])
    assert rep["max_abs_error"] <= np.abs(w).max(axis=1).max() / 127 / 2 + 1e-6
    assert rep["bits_per_weight"] == enc.bits_per_weight


def test_report_exact_codec_has_infinite_snr(rng):
    w = rng.standard_normal((4, 4)).astype(np.float32)
    rep = rbe_core.report(rbe_core.get_codec("raw").encode(w), w)
    assert rep["relative_rmse"] == 0 and rep["snr_db"] == math.inf and rep["max_abs_error"] == 0
