"""Plugin discovery and lookup.

Plugins are modules named by entry points in the ``rbe`` group; built-ins register through the
very same group. Each module implements hooks from ``rbe_core.hookspecs``. Setting
``RBE_DISABLE_PLUGINS=name1,name2`` (entry-point or distribution names) skips plugins. A plugin
that fails to import or to register is recorded in ``failures`` with its distribution name and
never breaks the others.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import attrs
import importlib_metadata
import pluggy

from . import hookspecs
from .abc import Codec, Kernel, lifts, lowers
from .errors import BackendUnavailableError, RBEFormatError, UnknownCodecError

log = logging.getLogger("rbe")

ENTRY_POINT_GROUP = "rbe"
DISABLE_ENV = "RBE_DISABLE_PLUGINS"
BACKEND_ENV = "RBE_BACKEND"


@attrs.frozen
class Entry:
    """One registered object: its kind, key, the object, and the plugin/distribution providing it."""

    kind: str
    key: str
    obj: Any
    plugin: str
    dist: str


@attrs.frozen
class PluginProblem:
    """A plugin that was skipped: failed to load/register, or disabled by the environment."""

    plugin: str
    dist: str
    error: str


def _key_of(kind: str, obj: Any) -> str:
    key = getattr(obj, "codec_id" if kind == "codecs" else "name", None)
    if not isinstance(key, str) or not key:
        attr = "codec_id" if kind == "codecs" else "name"
        raise TypeError(f"{obj!r} registered as {kind[:-1]} has no string {attr!r}")
    return key


def _kernel_keys(obj: Any) -> list[str]:
    """``codec_id@backend`` for each backend a registered ``Kernel`` class names."""
    codec_id, backends = getattr(obj, "codec_id", None), getattr(obj, "backends", None)
    if not isinstance(codec_id, str) or not codec_id or isinstance(backends, str) or not backends \
            or not all(isinstance(b, str) and b for b in backends):
        raise TypeError(f"{obj!r} registered as kernel needs a string 'codec_id' and a tuple of backend names 'backends'")
    return [f"{codec_id}@{b}" for b in backends]


def _entries(kind: str, obj: Any, plugin: str, dist: str) -> list[Entry]:
    keys = _kernel_keys(obj) if kind == "kernels" else [_key_of(kind, obj)]
    return [Entry(kind, key, obj, plugin, dist) for key in keys]


class Registry:
    """Everything the installed plugins provide, by kind and key."""

    def __init__(self, entry_points=None):
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in hookspecs.KINDS}
        self.failures: list[PluginProblem] = []
        self.disabled: list[PluginProblem] = []
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        if entry_points is None:
            entry_points = importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
        disabled = {s.strip() for s in os.environ.get(DISABLE_ENV, "").split(",") if s.strip()}
        for ep in sorted(entry_points, key=lambda e: e.name):
            self._load(ep, disabled)

    def _load(self, ep, disabled: set[str]) -> None:
        dist = ep.dist.name if getattr(ep, "dist", None) is not None else "?"
        if ep.name in disabled or dist in disabled:
            self.disabled.append(PluginProblem(ep.name, dist, f"disabled by {DISABLE_ENV}"))
            return
        try:
            module = ep.load()
            self._pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must not break the others
            self._fail(ep.name, dist, exc)
            return
        others = [p for p in self._pm.get_plugins() if p is not module]
        staged: list[Entry] = []
        try:
            for kind, hook in hookspecs.KINDS.items():
                caller = self._pm.subset_hook_caller(hook, remove_plugins=others)
                caller(register=lambda obj, _k=kind: staged.extend(_entries(_k, obj, ep.name, dist)))
        except Exception as exc:
            self._pm.unregister(module)
            self._fail(ep.name, dist, exc)
            return
        for entry in staged:
            table = self.entries[entry.kind]
            if entry.key in table:
                warnings.warn(
                    f"rbe: {entry.kind[:-1]} {entry.key!r} from {dist} ignored; already provided by "
                    f"{table[entry.key].dist}",
                    stacklevel=2,
                )
                continue
            table[entry.key] = entry

    def _fail(self, plugin: str, dist: str, exc: Exception) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        log.warning("rbe: plugin %r from distribution %r failed to load: %s", plugin, dist, msg)
        self.failures.append(PluginProblem(plugin, dist, msg))

    def lookup(self, kind: str, key: str) -> Entry | None:
        return self.entries[kind].get(key)


_REGISTRY: Registry | None = None
_BACKENDS: dict[str, Any] = {}


def registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY


def reload_plugins() -> Registry:
    """Rediscover plugins (after installing one, or changing ``RBE_DISABLE_PLUGINS``)."""
    global _REGISTRY
    _REGISTRY = None
    _BACKENDS.clear()
    importlib.invalidate_caches()
    return registry()


def get_codec(id_or_config: str | Mapping[str, Any], *, plugin: str | None = None):
    """A codec instance from an id (default settings) or a JSON config ``{"id": ..., ...}``.

    Raises ``UnknownCodecError`` (naming ``plugin``, the distribution that wrote the data, when
    known) or ``RBEFormatError`` for a config the codec rejects.
    """
    config = {"id": id_or_config} if isinstance(id_or_config, str) else dict(id_or_config)
    codec_id = config.get("id")
    if not isinstance(codec_id, str):
        raise RBEFormatError(f"codec config needs a string 'id', got {config!r}")
    entry = registry().lookup("codecs", codec_id)
    if entry is None:
        raise UnknownCodecError(codec_id, plugin, tuple(sorted(registry().entries["codecs"])))
    try:
        return entry.obj.from_config(config)
    except (TypeError, ValueError) as exc:
        raise RBEFormatError(f"invalid config for codec {codec_id!r}: {exc}") from exc


def codec_plugin(codec_id: str) -> str | None:
    """The distribution providing ``codec_id`` (recorded in files so readers know what to install)."""
    entry = registry().lookup("codecs", codec_id)
    return entry.dist if entry else None


def list_codecs() -> list[str]:
    return sorted(registry().entries["codecs"])


def kernels_for(backend: str) -> dict[str, Kernel]:
    """codec id -> an instance of each plugin ``Kernel`` registered for ``backend``."""
    suffix = f"@{backend}"
    return {key.removesuffix(suffix): entry.obj() for key, entry in registry().entries["kernels"].items()
            if key.endswith(suffix)}


def list_backends() -> list[dict[str, Any]]:
    """Every registered backend with availability, the reason when unavailable, and features."""
    rows = []
    for name, entry in sorted(registry().entries["backends"].items()):
        ok, reason = entry.obj.availability()
        rows.append(
            {
                "name": name,
                "dist": entry.dist,
                "available": ok,
                "reason": reason,
                "priority": entry.obj.priority,
                "features": list(entry.obj.features()) if ok else [],
            }
        )
    return rows


def get_backend(name: str | None = None):
    """A backend instance by name; default ``$RBE_BACKEND``, else the best available (logged).

    Asking by name for an unknown or unavailable backend raises ``BackendUnavailableError``
    saying why; there is no silent fallback.
    """
    name = name or os.environ.get(BACKEND_ENV) or None
    if name is None:  # availability only: a backend's features may load its libraries (torch)
        usable = [(e.obj.priority, n) for n, e in sorted(registry().entries["backends"].items())
                  if e.obj.availability()[0]]
        if not usable:
            raise BackendUnavailableError("no rbe backend is available")
        name = max(usable, key=lambda r: r[0])[1]
        log.info("rbe: using backend %r (best available; set %s to choose)", name, BACKEND_ENV)
    if name in _BACKENDS:
        return _BACKENDS[name]
    entry = registry().lookup("backends", name)
    if entry is None:
        known = ", ".join(sorted(registry().entries["backends"]))
        raise BackendUnavailableError(f"unknown backend {name!r}; registered backends: {known}")
    ok, reason = entry.obj.availability()
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
    _BACKENDS[name] = backend = entry.obj()
    backend.kernels = kernels_for(name)
    return backend


def codec_capabilities(codec_id: str) -> dict[str, Any]:
    """What rbe gives a registered codec: per available backend the path its tensors take
    ("kernel": a plugin kernel, "native": its lowered layout on native kernels, "generic"), and
    whether it trains (a torch form) and takes calibrated rounding (GPTQ)."""
    cls = registry().entries["codecs"][codec_id].obj
    paths = {}
    for row in list_backends():
        if row["available"]:
            backend = registry().entries["backends"][row["name"]].obj
            kernel = registry().lookup("kernels", f"{codec_id}@{row['name']}") is not None
            paths[row["name"]] = "kernel" if kernel else "native" if lowers(cls) and backend.runs_lowered() else "generic"
    trains = lifts(cls) or cls.torch_form is not Codec.torch_form
    calibrates = lifts(cls) or bool(getattr(cls, "accepts_calibration", False))
    return {"paths": paths, "trains": trains, "calibrates": calibrates}
