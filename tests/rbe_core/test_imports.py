"""The house rules on imports (docs/architecture.md): no import circles between rbe's modules,
lazy imports inside functions included; the bottom layer imports nothing above it; and the
torch-free entry points do not load torch."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"rbe_core": ROOT / "rbe_core", "rbe_plugins": ROOT / "plugins", "rbe_backends": ROOT / "backends"}

#: The bottom layer: errors, hook specs, array kinds, the canonical layout, the interfaces, the
#: registry and the container. They import only each other (and outside libraries).
BOTTOM = {"rbe_core.errors", "rbe_core.hookspecs", "rbe_core.version", "rbe_core.arrays", "rbe_core.native", "rbe_core.native.lowering",
          "rbe_core.abc", "rbe_core.registry", "rbe_core.container"}


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _targets(module: str, is_package: bool, node: ast.AST, known) -> set[str]:
    """rbe modules an ``import``/``from ... import`` statement loads (the nearest known module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = module.split(".") if is_package else module.split(".")[:-1]
        if node.level:
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module
        # ``from .x import y``: the submodule ``x.y`` if there is one, else ``x`` itself (a
        # compiled extension such as cffi's ``_kernels`` is no rbe module: nothing)
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        return {n for n in names if n in known and n != module}
    out = set()
    for name in names:
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in known and name != module:
            out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the rbe modules it imports anywhere in its text (functions included)."""
    known = _modules()
    graph = {}
    for module, (path, is_package) in known.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(module, is_package, node, known)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_the_bottom_layer_imports_nothing_above_it():
    graph = import_graph()
    upward = {m: sorted(graph[m] - BOTTOM) for m in BOTTOM if graph[m] - BOTTOM}
    assert upward == {}


def test_cycle_finder_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_core_registry_container_and_backends_do_not_import_torch(tmp_path):
    """Codecs, the registry, the container, the numpy and cffi backends and ``rbe inspect`` run
    without torch."""
    path = tmp_path / "w.rbe"
    done = _fresh(f"""
        import sys
        import numpy as np
        import rbe_core
        w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
        enc = rbe_core.get_codec("int4").encode(w)
        rbe_core.save({str(path)!r}, {{"w": enc}})
        enc = rbe_core.open({str(path)!r})["w"]
        rbe_core.get_backend()  # the best available: decided without loading torch
        for name in ("numpy", "cffi"):
            ok, _why = rbe_core.registry().lookup("backends", name).obj.availability()
            if ok:
                rbe_core.get_backend(name).linear(np.ones((2, 64), np.float32), enc)
        from rbe_core.cli import main
        main(["inspect", {str(path)!r}], standalone_mode=False)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
        print(loaded[:5])
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
