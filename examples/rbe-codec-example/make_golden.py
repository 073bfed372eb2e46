"""Write the plugin's golden files once: ``tests/golden/example-nf/`` in the rbe repository.

- ``input.safetensors``: the weight ``weight`` (24 x 100: no column count a whole group);
- ``encoded.rbe``: that weight encoded at 2, 3 and 4 bits (tensors ``nf2``, ``nf3``, ``nf4``,
  with group sizes 32, 64 and 128), written by the installed plugin;
- ``expected.safetensors``: each tensor's decode, under the same names.

There is no ``config.json`` (the codec configs are in the .rbe header), so rbe's own golden test
(``tests/plugins/test_golden.py``) does not pick the folder up: it runs only with the plugin
installed, in ``tests/test_example_plugin.py``. The folder is written only when it does not exist,
so files written by an earlier version stay the reference every later version must decode
bit-exactly. Needs the plugin installed (``pip install ./examples/rbe-codec-example``):

    python examples/rbe-codec-example/make_golden.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import safetensors.numpy

import rbe_core
from rbe_core.registry import codec_plugin

FOLDER = Path(__file__).resolve().parents[2] / "tests" / "golden" / "example-nf"
CONFIGS = {
    "nf2": {"id": "example-nf", "bits": 2, "group_size": 32},
    "nf3": {"id": "example-nf", "bits": 3, "group_size": 64},
    "nf4": {"id": "example-nf", "bits": 4, "group_size": 128},
}


def golden_input() -> np.ndarray:
    """24 x 100 smooth pattern plus noise, one all-zero row (deterministic)."""
    rng = np.random.default_rng(20240502)
    i, j = np.meshgrid(np.arange(24), np.arange(100), indexing="ij")
    w = (np.sin(i / 5.0) * np.cos(j / 7.0) + 0.05 * rng.standard_normal((24, 100))).astype(np.float32)
    w[5] = 0.0
    return w


def write() -> bool:
    """Write the folder unless it exists; True when written."""
    if FOLDER.exists():
        return False
    if codec_plugin("example-nf") != "rbe-codec-example":
        raise SystemExit("install the plugin first: pip install ./examples/rbe-codec-example")
    w = golden_input()
    encoded = {name: rbe_core.get_codec(config).encode(w) for name, config in CONFIGS.items()}
    FOLDER.mkdir(parents=True)
    safetensors.numpy.save_file({"weight": w}, str(FOLDER / "input.safetensors"))
    rbe_core.save(FOLDER / "encoded.rbe", encoded)
    safetensors.numpy.save_file({k: e.decode() for k, e in encoded.items()}, str(FOLDER / "expected.safetensors"))
    return True


if __name__ == "__main__":
    print(FOLDER, "written" if write() else "exists, kept")
