"""The models a server holds: loaded from .rbe files at start or at run time, unloaded on request.

Each causal LM gets a generation worker (``worker.Generator``) and its chat template (the one the
source model carried, stored at conversion as ``rbe.chat_template``; files without one use a
plain "role: content" transcript, said in the model's metadata); encoders answer embeddings. The
model card (``card``) is what the page draws: bits/weight per layer, stored size against the
dense model, the codecs used.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import attrs

from ..files import open as open_rbe
from ..models.generation import TextGeneration
from ..models.loading import load_inference
from ..registry import get_backend
from .chat import plain_tokenizer
from .metrics import Metrics
from .protocol import APIError
from .worker import Generator

log = logging.getLogger("rbe.serve")

_LAYER = re.compile(r"(?:^|\.)(?:blk|layers|layer|h)\.(\d+)\.")
#: used when a file carries no chat template: a plain transcript, then the assistant's turn
FALLBACK_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant:{% endif %}")


@attrs.define(eq=False)
class Served:
    name: str
    path: Path
    model: Any
    kind: str  # "causal" or "encoder"
    card: dict[str, Any]
    backend: str = ""
    generator: Generator | None = None
    template: Any = None  # a compiled jinja2 template (causal LMs)
    lock: threading.Lock = attrs.field(factory=threading.Lock)  # encoders: one batch at a time



def _template(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def model_card(path: Path, model) -> dict[str, Any]:
    """Bits/weight per layer, stored vs dense size, parameters and codecs of the .rbe at ``path``."""
    f = open_rbe(path)
    per_layer: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    codecs: dict[str, int] = defaultdict(int)
    stored = weights = 0
    for name in f:
        enc = f[name]
        key = _LAYER.search(name)
        group = f"layer {int(key.group(1)):03d}" if key else "embeddings, head, norms"
        per_layer[group][0] += 8.0 * enc.nbytes
        per_layer[group][1] += enc.numel
        codecs[f.headers[name]["codec"]["id"]] += enc.numel
        stored += enc.nbytes
        weights += enc.numel
    cfg = model.config
    return {
        "path": str(path), "parameters": weights, "stored_bytes": stored, "dense_fp32_bytes": 4 * weights,
        "dense_bf16_bytes": 2 * weights, "bits_per_weight": 8.0 * stored / max(weights, 1),
        "context_length": int(cfg.get("max_position", 0)) or None,
        "architecture": f.metadata.get("rbe.model", {}).get("architecture"),
        "codecs": dict(sorted(codecs.items(), key=lambda kv: -kv[1])),
        "layers": [{"name": k, "bits_per_weight": b / max(n, 1), "weights": int(n)}
                   for k, (b, n) in sorted(per_layer.items())],
        "chat_template": "rbe.chat_template" in f.metadata,
    }


class ModelStore:
    """Served models by name; thread-safe. ``loading`` counts loads in progress (health is 503)."""

    def __init__(self, *, backend: str | None, max_queue: int, slots: int, metrics: Metrics):
        self.backend, self.max_queue, self.slots, self.metrics = backend, max_queue, slots, metrics
        self._models: dict[str, Served] = {}
        self._lock = threading.Lock()
        self.loading = 0
        metrics.gauges["queue_depth"] = ("requests waiting per model", self._gauge(lambda g: g.queued))
        metrics.gauges["active_sequences"] = ("sequences being generated per model", self._gauge(lambda g: g.active))

    def _gauge(self, read):
        def values():
            with self._lock:
                return {(("model", n),): float(read(s.generator)) for n, s in self._models.items() if s.generator}
        return values

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def get(self, name: str) -> Served:
        with self._lock:
            found = self._models.get(name)
        if found is None:
            raise APIError(404, f"the model {name!r} does not exist; loaded: {', '.join(self.names()) or 'none'}",
                           param="model", code="model_not_found")
        return found

    def load(self, path: str | Path, name: str | None = None) -> Served:
        """Load ``path`` under ``name`` (default: the file's stem). Blocking; call off the event loop.
        A file that does not load is a 400 ``invalid_model`` naming only the file (why goes to the
        log: the reason may quote the file's bytes), a taken name a 409 ``model_exists``."""
        path = Path(path)
        name = name or path.stem
        with self._lock:
            if name in self._models:
                raise APIError(409, f"a model named {name!r} is already loaded", param="name", code="model_exists")
            self.loading += 1
        try:
            try:
                model = load_inference(path, self.backend)
                card = model_card(path, model)
            except APIError:
                raise
            except Exception as exc:  # noqa: BLE001 - any load failure is the caller's bad input
                log.warning("rbe serve: cannot load %s: %s", path, exc)
                raise APIError(400, f"{path.name!r} is not a valid .rbe model (the server's log says why)",
                               param="path", code="invalid_model") from None
            served = Served(name, path, model, "causal" if isinstance(model, TextGeneration) else "encoder", card,
                            get_backend(self.backend).name)
            if served.kind == "causal":
                template = open_rbe(path).metadata.get("rbe.chat_template")
                served.template = _template(template or FALLBACK_TEMPLATE)
                served.generator = Generator(name, model, max_queue=self.max_queue, slots=self.slots,
                                             metrics=self.metrics)
                plain_tokenizer(model)  # made here, not in the first request (0.2 s for 49k tokens)
            with self._lock:
                if name in self._models:  # loaded concurrently under the same name
                    if served.generator:
                        served.generator.stop()
                    raise APIError(409, f"a model named {name!r} is already loaded", param="name", code="model_exists")
                self._models[name] = served
            log.info("rbe serve: loaded %s as %r (%s, %s engine)", path, name, served.kind,
                     getattr(model, "engine_name", "torch"))
            return served
        finally:
            with self._lock:
                self.loading -= 1

    def unload(self, name: str) -> None:
        served = self.get(name)
        with self._lock:
            self._models.pop(name, None)
        if served.generator is not None:
            served.generator.stop()

    def close(self) -> None:
        for name in self.names():
            self.unload(name)
