"""The FastAPI application of ``rbe serve``: OpenAI-compatible routes, health, metrics, the page.

Routes (``/v1/*`` need ``Authorization: Bearer KEY`` when the server has a key; ``/``,
``/health`` and ``/metrics`` are public):

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` as Server-Sent Events in
  the OpenAI framing, ``stream_options.include_usage``), ``POST /v1/embeddings`` (encoders);
- ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /v1/models/{id}/card``,
  ``POST /v1/models/load`` ``{"path", "name"?}``, ``POST /v1/models/unload`` ``{"model"}``;
- ``GET /health`` (503 while a model loads), ``GET /metrics`` (Prometheus), ``GET /`` (the page).

Browsers are kept out unless invited (a page anywhere on the web can make a browser send
requests to 127.0.0.1): a ``Host`` other than the bound address (or an ``--allowed-host``) is
refused when the server listens on a loopback or named address (DNS rebinding), an ``Origin``
other than the server's own or a ``--cors-origin`` is refused (403), and a POST body that is not
``Content-Type: application/json`` is refused (415: a form or ``text/plain`` post needs no
preflight). Every check (JSON, field types, the model, prompt + max_tokens against the context, the queue)
happens before the first byte of a stream; errors are ``protocol.APIError`` in the OpenAI shape.
The event loop never runs a model: generation runs in each model's worker thread, embeddings
and loads in threads of their own.

This module builds the app (lifespan, auth, counting, errors); the routes are in ``routes``
(public, models, embeddings) and ``generation`` (completions, chat completions).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import sys
from urllib.parse import urlsplit

import attrs
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .generation import add_generation_routes
from .metrics import Metrics
from .protocol import APIError
from .routes import Startup, add_embedding_routes, add_model_routes, add_public_routes
from .store import ModelStore


@attrs.frozen
class Settings:
    models: tuple[str, ...] = ()
    backend: str | None = None
    api_key: str | None = None
    max_queue: int = 64
    slots: int = 8
    timeout: float = 600.0
    cors_origins: tuple[str, ...] = ()
    max_body: int = 8 << 20
    #: load the models before answering at all (Ray Serve replicas: a replica counts as ready when
    #: its app has started); otherwise they load in the background while /health says 503
    load_first: bool = False
    #: the address the server listens on (None: unknown, no Host check) and further host names
    #: clients may use in ``Host`` (a wildcard address accepts any unless some are named)
    host: str | None = None
    allowed_hosts: tuple[str, ...] = ()


def create_app(settings: Settings) -> FastAPI:
    """The server for ``settings``, with a store and metrics of its own (also on ``app.state``).
    Routes are registered in matching order: public, models, generation, embeddings."""
    metrics = Metrics()
    store = ModelStore(backend=settings.backend, max_queue=settings.max_queue, slots=settings.slots, metrics=metrics)
    startup = Startup(starting=len(settings.models) > 0)
    app = FastAPI(title="rbe serve", lifespan=_lifespan(settings, store, startup), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.store, app.state.metrics, app.state.settings = store, metrics, settings
    _add_middleware(app, settings, metrics)
    _add_error_handlers(app)
    add_public_routes(app, store, metrics, startup)
    add_model_routes(app, store, settings.max_body)
    add_generation_routes(app, store, metrics, max_body=settings.max_body, timeout=settings.timeout)
    add_embedding_routes(app, store, metrics, settings.max_body)
    return app


def _lifespan(settings: Settings, store: ModelStore, startup: Startup):
    """The app's lifespan: loads ``settings.models`` in a background task (awaited before serving
    when ``load_first``); a model that fails is printed and kept in ``startup.load_errors``, the
    server stays up; ``startup.starting`` clears when all were tried. On exit: cancels the loading,
    closes the store."""

    async def load_all():
        try:
            for path in settings.models:
                try:
                    await asyncio.to_thread(store.load, path)
                except APIError as exc:  # the server stays up (models can be loaded later); say why
                    startup.load_errors.append(exc.message)
                    print(f"rbe serve: {exc.message}", file=sys.stderr, flush=True)
        finally:
            startup.starting = False

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(load_all())
        if settings.load_first:
            await task
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(store.close)

    return lifespan


def _add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """CORS for ``settings.cors_origins`` (if any), inside the guard: the API key on ``/v1/*``
    (preflight ``OPTIONS`` exempt; 401 before any route runs), and every answer counted as
    ``requests`` by route template (``other`` when none matched) and status."""
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])

    hosts = _allowed_hosts(settings)

    @app.middleware("http")
    async def count_and_guard(request: Request, call_next):
        try:
            _check_browser(request, hosts, settings.cors_origins)
            if request.url.path.startswith("/v1/") and settings.api_key is not None and request.method != "OPTIONS":
                _check_key(request.headers.get("authorization", ""), settings.api_key)
            response = await call_next(request)
        except APIError as exc:
            response = _error(exc)
        route = request.scope.get("route")
        metrics.count("requests", endpoint=getattr(route, "path", "other"), status=response.status_code)
        return response


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _allowed_hosts(settings: Settings) -> set[str] | None:
    """Host names ``Host`` may carry (lower case, no port); None: any (no bound address known, or
    a wildcard one with no ``allowed_hosts``)."""
    bound = (settings.host or "").strip("[]").lower()
    wildcard = bound in ("", "0.0.0.0", "::")
    if wildcard and not settings.allowed_hosts:
        return None
    names = {h.strip("[]").lower() for h in settings.allowed_hosts}
    if not wildcard:
        names.add(bound)
        if bound in _LOOPBACK_NAMES or _is_loopback(bound):
            names.update(_LOOPBACK_NAMES)
    return names


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(netloc: str) -> str:
    """``netloc`` (``host[:port]``, ``[v6][:port]``) without its port, lower case."""
    try:
        return (urlsplit(f"//{netloc}").hostname or "").lower()
    except ValueError:
        return ""


def _check_browser(request: Request, hosts: set[str] | None, cors_origins: tuple[str, ...]) -> None:
    """403 for a foreign ``Host`` (DNS rebinding) or ``Origin`` (another site's page), 415 for a
    POST whose body is not declared JSON (a form or text/plain post needs no CORS preflight)."""
    host = request.headers.get("host", "")
    if hosts is not None and _host_name(host) not in hosts:
        raise APIError(403, "this Host is not served here (start with --allowed-host NAME to allow it)",
                       type="invalid_request_error", code="host_not_allowed")
    origin = request.headers.get("origin")
    if origin is not None and origin not in cors_origins and urlsplit(origin).netloc.lower() != host.lower():
        raise APIError(403, "requests from other origins are refused (start with --cors-origin ORIGIN to allow one)",
                       type="invalid_request_error", code="origin_not_allowed")
    if request.method == "POST":
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, "request bodies must be JSON (Content-Type: application/json)",
                           type="invalid_request_error", code="unsupported_media_type")


def _check_key(authorization: str, api_key: str) -> None:
    """401 ``invalid_api_key`` unless ``authorization`` is ``Bearer <api_key>`` (the scheme in any
    case; the key compared in constant time)."""
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or invalid API key (Authorization: Bearer KEY)",
                       type="invalid_request_error", code="invalid_api_key")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in the OpenAI shape: ``APIError`` as itself, Starlette's HTTP errors (404, 405)
    as ``invalid_request_error``, anything else as a 500 ``server_error`` naming the exception."""

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return _error(APIError(exc.status_code, str(exc.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        return _error(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)
