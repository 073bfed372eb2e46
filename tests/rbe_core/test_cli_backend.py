"""``--backend NAME`` on the computing commands: unknown or unavailable backends fail first, with
the reason and exit status 2; the automatic choice is logged with ``-v``."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import rbe_core
from rbe_core.cli import main

COMMANDS = {
    "infer": lambda f: ["infer", f, "--prompt", "x"],
    "embed": lambda f: ["embed", f, "hello"],
    "bench": lambda f: ["bench", f],
    "finetune": lambda f: ["finetune", f, "--data", f, "--steps", "1", "-o", f + ".out"],
}


def run(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture
def junk(tmp_path):
    path = tmp_path / "model.rbe"
    path.write_bytes(b"not an rbe file")
    return str(path)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unknown_backend_is_an_error_naming_the_known_ones(junk, command):
    code, out = run(*COMMANDS[command](junk), "--backend", "nope")
    assert code == 2
    assert "unknown backend 'nope'" in out and "numpy" in out and "Traceback" not in out


def test_convert_checks_the_backend_before_converting(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    out = tmp_path / "m.rbe"
    code, text = run("convert", str(src), "-o", str(out), "--backend", "nope")
    assert code == 2 and "unknown backend 'nope'" in text
    assert not out.exists()


@pytest.mark.skipif(any(b["name"] == "cuda" and b["available"] for b in rbe_core.list_backends()),
                    reason="a CUDA device is visible")
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unavailable_backend_says_why(junk, command):
    code, out = run(*COMMANDS[command](junk), "--backend", "cuda")
    assert code == 2 and "backend 'cuda' is not available" in out and "CUDA" in out


def test_env_backend_is_checked_too(junk, monkeypatch):
    monkeypatch.setenv("RBE_BACKEND", "nope")
    code, out = run(*COMMANDS["infer"](junk))
    assert code == 2 and "unknown backend 'nope'" in out


def test_automatic_choice_is_logged_with_verbose(junk, monkeypatch):
    monkeypatch.delenv("RBE_BACKEND", raising=False)
    best = max((b for b in rbe_core.list_backends() if b["available"]), key=lambda b: b["priority"])["name"]
    code, out = run("-v", *COMMANDS["infer"](junk))
    assert code == 2  # the junk file fails after the backend was chosen
    assert f"using backend '{best}'" in out
    code, quiet = run(*COMMANDS["infer"](junk))
    assert "using backend" not in quiet


def test_every_computing_command_has_the_option():
    for name in ("convert", "infer", "embed", "bench", "finetune"):
        assert "--backend" in {opt for p in main.commands[name].params for opt in p.opts}, name
