"""Register rbe with transformers and PEFT when (and only when) they are imported; ``install()`` runs on ``import rbe_core``.

For each module below: already imported, its rbe registration runs now; else a ``sys.meta_path``
finder wraps that module's loader so the registration runs right after the module has executed.
Nothing here imports transformers, PEFT or torch. A failing registration logs a warning and never
breaks the import that triggered it.
"""

from __future__ import annotations

import importlib
import logging
import sys

log = logging.getLogger("rbe.hf")

#: The module that holds what a registration writes into -> (rbe module, its function doing it).
HOOKS = {"transformers.quantizers.auto": ("rbe_core.hf.quantizer", "register"),
         "peft.tuners.lora.model": ("rbe_core.hf.lora", "enable")}


def _register(target: str) -> None:
    module, function = HOOKS[target]
    try:
        getattr(importlib.import_module(module), function)()
    except Exception as exc:  # a broken integration must not break the user's import
        log.warning("rbe: could not register with %s (%s.%s): %s: %s", target.partition(".")[0], module,
                    function, type(exc).__name__, exc)


class _Loader:
    """The module's own loader, then its registration (other attributes pass through)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register(module.__name__)


class Finder:
    """A ``sys.meta_path`` finder for the modules in ``HOOKS``: the spec the other finders give, its loader wrapped."""

    @staticmethod
    def find_spec(name: str, path=None, target=None):
        if name not in HOOKS:
            return None
        for finder in sys.meta_path:
            if isinstance(finder, Finder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now with what is imported, and hook what is not (idempotent)."""
    if not any(isinstance(f, Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, Finder())
    for target in HOOKS:
        if target in sys.modules:
            _register(target)
