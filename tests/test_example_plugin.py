"""The example third-party plugin, pip-installed into the test environment like a user would."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rbe-codec-example"


def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def installed_example():
    pip("install", "--no-deps", "--no-build-isolation", str(EXAMPLE))
    yield
    pip("uninstall", "-y", "rbe-codec-example")


def fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter, which discovers plugins from scratch."""
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return done.stdout


def test_listed_with_distribution_name(installed_example):
    out = fresh_python("from rbe_core.cli import main; main(['plugins', '--json'])")
    codecs = {c["name"]: c for c in json.loads(out)["codecs"]}
    assert codecs["example-fp16"]["dist"] == "rbe-codec-example"
    assert codecs["int8"]["dist"] == "rbe"


def test_usable_by_name_end_to_end(installed_example, tmp_path):
    out = fresh_python(
        "import json, numpy as np, rbe_core\n"
        "w = np.random.default_rng(0).standard_normal((32, 48)).astype(np.float32) * 1e3\n"
        "enc = rbe_core.get_codec('example-fp16').encode(w)\n"
        f"rbe_core.save({str(tmp_path / 'e.rbe')!r}, {{'w': enc}})\n"
        f"back = rbe_core.open({str(tmp_path / 'e.rbe')!r})['w']\n"
        "x = np.ones((2, 48), np.float32)\n"
        "y = rbe_core.get_backend('numpy').linear(x, back)\n"
        "print(json.dumps({'plugin': rbe_core.open(" + repr(str(tmp_path / "e.rbe")) + ").headers['w']['plugin'],"
        " 'rmse': rbe_core.report(back, w)['relative_rmse'], 'bpw': back.bits_per_weight,"
        " 'lin': float(np.abs(y - x @ w.T).max() / np.abs(x @ w.T).max())}))\n"
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["plugin"] == "rbe-codec-example"
    assert result["rmse"] < 1e-3 and 16 < result["bpw"] < 20 and result["lin"] < 1e-3


def test_file_written_by_uninstalled_plugin_names_it(installed_example, tmp_path):
    fresh_python(
        "import numpy as np, rbe_core\n"
        f"rbe_core.save({str(tmp_path / 'e.rbe')!r}, {{'w': rbe_core.get_codec('example-fp16').encode(np.ones((2, 2), np.float32))}})\n"
    )
    code = f"import rbe_core; rbe_core.open({str(tmp_path / 'e.rbe')!r})['w']"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"RBE_DISABLE_PLUGINS": "example-fp16", "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0
    assert "UnknownCodecError" in done.stderr and "pip install rbe-codec-example" in done.stderr
