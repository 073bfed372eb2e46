"""``--engine`` on ``rbe infer`` / ``rbe bench``: the native engine is used and reported, a model
that cannot use it says so, and ``infer`` stops at the model's context."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import rbe_core
from rbe_core.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from _model_helpers import tiny_llama, write_gguf  # noqa: E402

_CFFI = next(b for b in rbe_core.list_backends() if b["name"] == "cffi")
needs_cffi = pytest.mark.skipif(not _CFFI["available"], reason=f"cffi backend unavailable: {_CFFI['reason']}")


def run(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-engine")
    write_gguf(tiny_llama(tie_word_embeddings=True), tmp / "m.gguf")
    return str(rbe_core.compress_model(tmp / "m.gguf", tmp / "m.rbe", codec="int8", progress=False))


def test_infer_clamps_max_tokens_to_the_context(model_file):
    code, out = run("infer", model_file, "--prompt", "the the", "--max-tokens", "100000", "--backend", "numpy")
    assert code == 0, out
    assert "clamped to" in out and "64-token context" in out


@needs_cffi
def test_infer_and_bench_run_the_native_engine(model_file):
    code, out = run("-v", "infer", model_file, "--prompt", "the", "--max-tokens", "5", "--backend", "cffi")
    assert code == 0 and "runs in its native engine" in out, out
    code, out = run("bench", model_file, "--backend", "cffi", "--prompt-tokens", "8", "--new-tokens", "4", "--json")
    assert code == 0, out
    rows = json.loads(out[out.index("["):])
    assert rows[0]["engine"] == "native" and set(rows[0]["decode_ms_per_token"]) == {"kernels", "attention", "rest"}
    assert rows[1]["engine"] == "torch"  # the dense fp32 twin
    code, out = run("bench", model_file, "--backend", "cffi", "--prompt-tokens", "8", "--new-tokens", "4",
                    "--engine", "torch", "--json")
    assert code == 0 and json.loads(out[out.index("["):])[0]["engine"] == "torch"


def test_engine_native_without_one_is_a_clear_error(model_file):
    code, out = run("infer", model_file, "--prompt", "the", "--backend", "numpy", "--engine", "native")
    assert code == 2 and "no native engine" in out and "Traceback" not in out


@needs_cffi
def test_native_infer_runs_without_torch_and_agrees_with_the_torch_modules(model_file):
    """``rbe infer`` on the native engine loads no torch (``load_inference``: ``NativeLM``) and
    generates the tokens the torch modules generate."""
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        from rbe_core.cli import main
        main(["infer", {model_file!r}, "--prompt", "the the", "--max-tokens", "8", "--backend", "cffi"],
             standalone_mode=False)
        print("torch loaded:", "torch" in sys.modules)
    """)
    env = {**os.environ, "RBE_ENGINE_ACT": "f32"}  # float prefill: the torch modules' exact arithmetic
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "torch loaded: False"
    code, out = run("infer", model_file, "--prompt", "the the", "--max-tokens", "8", "--backend", "cffi",
                    "--engine", "torch")
    assert code == 0 and done.stdout.rsplit("torch loaded", 1)[0] == out


@needs_cffi
def test_serving_a_native_model_loads_no_torch(model_file):
    """The server's model store loads a causal LM into the native engine without torch."""
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        from rbe_core.serve.app import Settings, create_app
        from rbe_core.serve.metrics import Metrics
        from rbe_core.serve.store import ModelStore
        store = ModelStore(backend="cffi", max_queue=2, slots=1, metrics=Metrics())
        served = store.load({model_file!r})
        print(served.kind, served.model.engine_name, len(served.model.generate("the", 3)) >= 0)
        store.close()
        print("torch loaded:", "torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == ["causal native True", "torch loaded: False"]
