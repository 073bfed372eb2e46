"""The ``trellis`` codec's design measurements (docs/codecs/trellis.md).

1. Squared error on unit-normal data: the Lloyd–Max scalar grid (``hadamard``'s normal grid) against
   the trellis code at 2 to 6 bits (its ``normal`` and ``int8`` tables), with the distortion-rate
   bound ``2**(-2 * bits)``.
2. ``--multipliers``: the code table's multiplier (state ``s`` takes quantile ``m * s mod 256``),
   every odd ``m``, the step scale fitted per bits (2, 3, 4). ``--scales``: the squared error of
   each step scale (step = scale × RMS) at every bits.
3. Block LDLQ against GPTQ on correlated activations: relative output error ``‖X(W - Ŵ)ᵀ‖ / ‖XWᵀ‖``
   of ``hadamard`` (normal grid, GPTQ) and ``trellis`` (block LDLQ) at the same bits, for several
   block and lookahead sizes.

    python benchmarks/trellis_codes.py [--multipliers] [--scales]
"""

from __future__ import annotations

import argparse
import time
from statistics import NormalDist

import numpy as np

import rbe_core
from rbe_plugins import _trellis, trellis
from rbe_plugins.hadamard import grid_for

BITS = (2, 3, 4)
ALL_BITS = (2, 3, 4, 5, 6)  # 6: measured, not offered (no gain over hadamard's clipped grid)


def trellis_mse(x: np.ndarray, table: np.ndarray, bits: int, scale: float) -> float:
    """Mean squared error of ``x`` (T, N) coded by the trellis with ``table * scale``."""
    states = _trellis.search(x / np.float32(scale), np.ones_like(x), bits, table=table)
    return float(np.mean((x - np.float32(scale) * table[states]) ** 2))


def scalar_mse(x: np.ndarray, bits: int) -> float:
    """Mean squared error of ``x`` rounded to the Lloyd–Max grid (its optimal unit scale)."""
    grid = grid_for(bits, "normal")
    return float(np.mean((x - grid.levels[grid.nearest(x)]) ** 2))


def table_for(multiplier: int) -> np.ndarray:
    inv = NormalDist().inv_cdf
    return np.array([inv(((multiplier * s) % 256 + 0.5) / 256) for s in range(256)], dtype=np.float32)


def best_scale(x: np.ndarray, table: np.ndarray, bits: int) -> tuple[float, float]:
    return min((trellis_mse(x, table, bits, a), a) for a in np.arange(0.95, 1.36, 0.05))


def unit_normal_table() -> None:
    x = np.random.default_rng(7).standard_normal((1024, 512)).astype(np.float32)
    print("| bits | Lloyd–Max MSE | trellis MSE (step = scale × RMS) | gain dB | `int8` table MSE | gain dB "
          "| bound 2^-2b | search Mw/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for bits in ALL_BITS:
        scale = trellis._STEP_PER_RMS[bits]
        t0 = time.perf_counter()
        mse = trellis_mse(x, _trellis.codebook("normal"), bits, scale)
        rate = x.size / (time.perf_counter() - t0) / 1e6
        mse8 = trellis_mse(x, _trellis.codebook("int8"), bits, scale / _trellis.TABLE_SCALE["int8"])
        lm = scalar_mse(x, bits)
        print(f"| {bits} | {lm:.5f} | {mse:.5f} ({scale}) | {10 * np.log10(lm / mse):.2f} | {mse8:.5f} | "
              f"{10 * np.log10(lm / mse8):.2f} | {2.0 ** (-2 * bits):.5f} | {rate:.2f} |")


def multiplier_scan() -> None:
    x = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)
    lm = {b: scalar_mse(x, b) for b in BITS}
    rows = []
    for m in range(1, 256, 2):
        gains = [10 * np.log10(lm[b] / best_scale(x, table_for(m), b)[0]) for b in BITS]
        rows.append((float(np.mean(gains)), m, gains))
    rows.sort(reverse=True)
    print("| multiplier | gain dB at 2 / 3 / 4 bits | mean |")
    print("|---:|---|---:|")
    for mean, m, gains in rows[:5] + rows[-3:]:
        print(f"| {m} | {' / '.join(f'{g:.2f}' for g in gains)} | {mean:.2f} |")


def scale_scan() -> None:
    x = np.random.default_rng(7).standard_normal((1024, 512)).astype(np.float32)
    scales = np.arange(0.95, 1.56, 0.05)
    print("| bits | " + " | ".join(f"{a:.2f}" for a in scales) + " |")
    print("|---|" + "---:|" * len(scales))
    for bits in ALL_BITS:
        print(f"| {bits} | " + " | ".join(f"{trellis_mse(x, _trellis.codebook('normal'), bits, a):.5f}" for a in scales) + " |")


def ldlq_table() -> None:
    rng = np.random.default_rng(5)
    cols = 256
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols)
    x = (rng.standard_normal((4096, cols)) @ mix + 0.3 * rng.standard_normal((4096, 1))).astype(np.float32)
    x[:, :3] *= 8.0
    w = rng.standard_normal((128, cols)).astype(np.float32)

    def out_err(enc):
        return float(np.linalg.norm(x @ (enc.decode() - w).T) / np.linalg.norm(x @ w.T))

    variants = [(16, 0), (32, 0), (16, 8), (8, 8), (4, 8)]
    print("| bits | hadamard GPTQ | trellis RTN | " + " | ".join(f"LDLQ block {b} + {a}" for b, a in variants) + " |")
    print("|---|" + "---:|" * (2 + len(variants)))
    saved = trellis._BLOCK, trellis._LOOKAHEAD
    for bits in BITS:
        scalar = rbe_core.get_codec({"id": "hadamard", "bits": bits, "grid": "normal"})
        codec = rbe_core.get_codec({"id": "trellis", "bits": bits})
        cells = [out_err(scalar.encode(w, calibration=x)), out_err(codec.encode(w))]
        for block, ahead in variants:
            trellis._BLOCK, trellis._LOOKAHEAD = block, ahead
            cells.append(out_err(codec.encode(w, calibration=x)))
        trellis._BLOCK, trellis._LOOKAHEAD = saved
        print(f"| {bits} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multipliers", action="store_true", help="also scan the code table's multiplier")
    parser.add_argument("--scales", action="store_true", help="also scan the step scale")
    args = parser.parse_args()
    unit_normal_table()
    if args.multipliers:
        multiplier_scan()
    if args.scales:
        scale_scan()
    ldlq_table()


if __name__ == "__main__":
    main()
