"""Decode steps of k sequences at once in the native engine (what ``rbe serve`` runs for k streams).

    python benchmarks/batch_decode.py MODEL.rbe                    # k = 1, 2, 3, 4, 8, 16
    python benchmarks/batch_decode.py MODEL.rbe --k 1,8 --steps 32 --act f32

The model is loaded once (cffi backend, native engine); for each k, k sequences get a prompt of
``--prompt`` random tokens each in one ``forward_batch``, then ``--steps`` decode steps advance
all k by one token each. Printed per k: tokens a second over all sequences, the step time, and the
engine's own split of it (weight products, attention, the rest) from ``NativeDecoder.profile``.
``--act`` sets ``RBE_ENGINE_ACT`` (the products' inputs: int8, the default, or f32).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--k", default="1,2,3,4,8,16", help="sequence counts, comma-separated")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--act", choices=("int8", "f32"), default=None)
    args = ap.parse_args()
    if not Path(args.model).is_file():
        sys.exit(f"batch_decode.py: {args.model}: no such file")
    if args.act:
        os.environ["RBE_ENGINE_ACT"] = args.act
    import rbe_core

    native = rbe_core.load_model(args.model, "cffi", engine="native").native
    print(f"{args.model}: {platform.processor() or platform.machine()}, act {os.environ.get('RBE_ENGINE_ACT', 'int8')}")
    rng = np.random.default_rng(0)
    for k in (int(v) for v in args.k.split(",")):
        native.forward_batch([(s, rng.integers(100, 1000, args.prompt).tolist(), 0) for s in range(k)])
        native.profile()
        start = time.perf_counter()
        for step in range(args.steps):
            native.forward_batch([(s, [int(rng.integers(100, 1000))], args.prompt + step) for s in range(k)])
        took = (time.perf_counter() - start) / args.steps
        split = {name: seconds / args.steps * 1e3 for name, seconds in native.profile().items()}
        print(f"k={k:3d} {k / took:8.1f} tok/s  step {took * 1e3:7.2f} ms  "
              + "  ".join(f"{name} {ms:6.2f}" for name, ms in split.items()), flush=True)


if __name__ == "__main__":
    main()
