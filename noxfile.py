"""Test matrix: the same suite once per backend, forced by name with RBE_BACKEND; plus lint.

Sessions run in the interpreter nox itself runs in (`make test` uses .venv), so every session
tests the installed project. A backend that cannot run here skips with a one-line reason, unless
it is listed in RBE_REQUIRE_BACKENDS (CI sets it), where being unavailable is a failure.
"""

from __future__ import annotations

import json
import os
import sys

import nox

nox.options.sessions = ["lint", "tests", "ray"]
nox.options.error_on_missing_interpreters = True

BACKENDS = ["numpy", "cffi", "torch", "cuda"]


def _backend_status(session: nox.Session, name: str) -> dict:
    probe = (
        "import json, rbe_core; "
        f"print(json.dumps([b for b in rbe_core.list_backends() if b['name'] == {name!r}]))"
    )
    out = session.run(sys.executable, "-c", probe, silent=True, external=True)
    rows = json.loads(out.strip().splitlines()[-1])
    return rows[0] if rows else {"available": False, "reason": f"no plugin registers backend {name!r}"}


@nox.session(venv_backend="none")
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """Run the whole suite with RBE_BACKEND=<backend>."""
    status = _backend_status(session, backend)
    required = {s.strip() for s in os.environ.get("RBE_REQUIRE_BACKENDS", "").split(",") if s.strip()}
    if not status["available"]:
        if backend in required:
            session.error(f"backend {backend!r} is required here but unavailable: {status['reason']}")
        session.skip(f"backend {backend!r} unavailable: {status['reason']}")
    session.env["RBE_BACKEND"] = backend
    session.run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not ray", *session.posargs,
                external=True)


@nox.session(venv_backend="none")
def ray(session: nox.Session) -> None:
    """Distributed conversion and serving on a local Ray cluster (tests marked ``ray``)."""
    session.run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "ray",
                "tests/rbe_core/compression", "tests/rbe_core/serve", *session.posargs, external=True)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.run(sys.executable, "-m", "ruff", "check", ".", external=True)
