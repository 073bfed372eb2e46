"""``--ray HOST:PORT`` against a cluster that checks tokens (``ray start`` with ``RAY_AUTH_MODE=token``):
without the token the one-line error says what to set; with it the conversion runs there."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from _model_helpers import free_port, tiny_llama, write_gguf  # noqa: E402

pytest.importorskip("ray", reason="Ray is not installed (pip install 'rbe[ray]')")
pytestmark = pytest.mark.ray
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A token-checking head started by ``ray start`` (its token in a file of the test's own)."""
    token = tmp_path_factory.mktemp("auth") / "token"
    token.write_text(secrets.token_hex(16))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port = free_port()
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard=false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=180)
    yield f"127.0.0.1:{port}", token
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def _convert(src: Path, out: Path, address: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.run([sys.executable, "-m", "rbe_core.cli", "convert", str(src), "-o", str(out), "--codec", "int8",
                           "--no-calibration", "--quiet", "--ray", address], env={**clean, **env},
                          capture_output=True, text=True, timeout=300)


def test_a_token_cluster_says_what_to_set_then_works_with_it(head, tmp_path):
    address, token = head
    write_gguf(tiny_llama(tie_word_embeddings=True, intermediate_size=128), tmp_path / "tiny.gguf")
    refused = _convert(tmp_path / "tiny.gguf", tmp_path / "a.rbe", address)
    assert refused.returncode == 2 and "RAY_AUTH_MODE=token" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and not (tmp_path / "a.rbe").exists()
    done = _convert(tmp_path / "tiny.gguf", tmp_path / "b.rbe", address, RAY_AUTH_MODE="token",
                    RAY_AUTH_TOKEN_PATH=str(token))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "b.rbe").exists()
