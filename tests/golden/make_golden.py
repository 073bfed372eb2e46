"""Write golden files for the built-in codecs: ``tests/golden/<name>/`` (a codec id, or a codec id
and the variant it pins) with ``config.json``,
``encoded.safetensors`` (payload; shape and dtype in its metadata) and ``expected.safetensors``
(the decode). A codec's folder is written only when it does not exist yet, so files written by an
earlier version stay the reference every later version must decode bit-exactly.

    python tests/golden/make_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.numpy

import rbe_core

HERE = Path(__file__).parent
CONFIGS = {
    "int8": {"id": "int8"},
    "raw": {"id": "raw", "storage": "float16"},
    "hadamard": {"id": "hadamard", "bits": 3, "group_size": 8},
    "hadamard-normal": {"id": "hadamard", "bits": 4, "group_size": 8, "grid": "normal"},
    "trellis": {"id": "trellis", "bits": 3, "group_size": 8, "table": "normal"},
    "trellis-int8": {"id": "trellis", "bits": 3, "group_size": 8, "table": "int8"},
    "int4": {"id": "int4", "group_size": 16},
    "cyclic8": {"id": "cyclic8", "group_size": 16},
    "cyclic16": {"id": "cyclic16", "group_size": 16},
    "packed64": {"id": "packed64", "block": 8},
    "packed128": {"id": "packed128", "block": 8},
    "hybrid": {"id": "hybrid", "block_size": 64, "transform": "dct", "geometry": "poincare", "grade": "B", "k": None, "workers": 1},
}


def golden_input() -> np.ndarray:
    """24 x 40 smooth pattern plus noise (deterministic)."""
    rng = np.random.default_rng(20240501)
    i, j = np.meshgrid(np.arange(24), np.arange(40), indexing="ij")
    return (np.sin(i / 5.0) * np.cos(j / 7.0) + 0.05 * rng.standard_normal((24, 40))).astype(np.float32)


def write(name: str) -> bool:
    folder = HERE / name
    if folder.exists():
        return False
    codec = rbe_core.get_codec(CONFIGS[name])
    enc = codec.encode(golden_input())
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(codec.get_config(), indent=1, sort_keys=True) + "\n")
    meta = {"shape": json.dumps(list(enc.shape)), "dtype": enc.dtype}
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in enc.payload.items()}, str(folder / "encoded.safetensors"), metadata=meta)
    safetensors.numpy.save_file({"decoded": enc.decode()}, str(folder / "expected.safetensors"))
    return True


if __name__ == "__main__":
    for name in CONFIGS:
        print(name, "written" if write(name) else "exists, kept")
