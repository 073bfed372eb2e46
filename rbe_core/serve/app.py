"""The FastAPI application of ``rbe serve``: OpenAI-compatible routes, health, metrics, the page.

Routes (``/v1/*``, ``/tokenize`` and ``/detokenize`` need ``Authorization: Bearer KEY`` when the
server has a key; ``/``, ``/health`` and ``/metrics`` are public):

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` as Server-Sent Events in
  the OpenAI framing, ``stream_options.include_usage``), ``POST /v1/embeddings`` (encoders),
  ``POST /tokenize``, ``POST /detokenize``;
- ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /v1/models/{id}/card``,
  ``POST /v1/models/load`` ``{"path", "name"?}`` (only files inside ``Settings.models_dir``;
  refused when it is None), ``POST /v1/models/unload`` ``{"model"}``;
- ``GET /health`` (503 while a model loads), ``GET /metrics`` (Prometheus), ``GET /`` (the page).

Browsers are kept out unless invited (a page anywhere on the web can make a browser send
requests to 127.0.0.1): a ``Host`` other than the bound address (or an ``--allowed-host``) is
refused when the server listens on a loopback or named address (DNS rebinding), an ``Origin``
other than the server's own or a ``--cors-origin`` is refused (403), and a POST body that is not
``Content-Type: application/json`` is refused (415: a form or ``text/plain`` post needs no
preflight). Every check (JSON, field types, the model, prompt + max_tokens against the context, the queue)
happens before the first byte of a stream; errors are ``protocol.APIError`` in the OpenAI shape,
and every answer, a 500 from a bug included, is counted in ``/metrics``.

Slow clients cannot hold the server: a request body must arrive within ``Settings.body_timeout``
(408), and ``head_deadline_protocol`` (the uvicorn protocol ``rbe serve`` runs) closes a
connection whose request head has not arrived in time.

The event loop never runs a model: generation runs in each model's worker thread, embeddings
and loads in threads of their own.

This module builds the app (lifespan, auth, counting, errors); the routes are in ``routes``
(public, models, embeddings) and ``generation`` (completions, chat completions, tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import sys
from pathlib import Path
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

log = logging.getLogger("rbe.serve")


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
    #: the directory ``POST /v1/models/load`` may load from (None: loading over HTTP is refused)
    models_dir: str | None = None
    #: seconds a request body may take to arrive once the route starts reading it (408 beyond)
    body_timeout: float = 30.0


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
    add_model_routes(app, store, settings.max_body, Path(settings.models_dir).resolve() if settings.models_dir else None)
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
    """Outermost first: the guard (``Guard``), CORS for ``settings.cors_origins`` (if any), the
    body deadline."""
    app.add_middleware(BodyDeadline, seconds=settings.body_timeout)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Guard, settings=settings, metrics=metrics)


class Guard:
    """ASGI middleware: the browser checks and the API key on ``/v1/*`` (preflight ``OPTIONS``
    exempt; refused before any route runs), and every answer counted as ``requests`` by route
    template (``other`` when none matched) and status; an exception no handler took becomes a
    counted 500 (or, once a stream has started, ends it). Plain ASGI, so a stream's chunks pass
    straight through (Starlette's ``BaseHTTPMiddleware`` relays each through a task and a
    memory stream)."""

    def __init__(self, app, settings: Settings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.hosts = _allowed_hosts(settings)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request, status = Request(scope), []

        async def counted(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            self._check(request)
            await self.app(scope, receive, counted)
        except Exception as exc:  # noqa: BLE001 - a bug in a route: answered and counted like any other
            if status:  # the answer has started: nothing else can be sent
                raise
            err = exc if isinstance(exc, APIError) else _internal_error(request, exc)
            await _error(err)(scope, receive, counted)
        finally:
            route = scope.get("route")
            self.metrics.count("requests", endpoint=getattr(route, "path", "other"), status=status[0] if status else 500)

    def _check(self, request: Request) -> None:
        _check_browser(request, self.hosts, self.settings.cors_origins)
        if _needs_key(request.url.path) and self.settings.api_key is not None and request.method != "OPTIONS":
            _check_key(request.headers.get("authorization", ""), self.settings.api_key)


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _needs_key(path: str) -> bool:
    """``/v1/*``, ``/tokenize`` and ``/detokenize`` answer only with the key (when there is one)."""
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


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
    as ``invalid_request_error``, anything else as a 500 ``server_error`` naming the exception's
    type (``count_and_guard`` answers those from routes itself; this catches the rest)."""

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return _error(APIError(exc.status_code, str(exc.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return _error(_internal_error(request, exc))


def _internal_error(request: Request, exc: Exception) -> APIError:
    """A 500 ``server_error`` naming ``exc``'s type (its traceback goes to the server's log only)."""
    log.error("rbe serve: internal error answering %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error")


def _error(exc: APIError) -> JSONResponse:
    """``exc`` as its JSON answer; a 408 also closes the connection (the rest of the body may
    never come)."""
    headers = {"connection": "close"} if exc.status == 408 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


class BodyDeadline:
    """ASGI middleware: once a route starts reading a request body, all of it must arrive within
    ``seconds``, else ``receive`` raises a 408 ``request_timeout`` ``APIError`` into that route.
    After the last body chunk ``receive`` is passed through untimed (it then waits for a disconnect)."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            receive = _TimedReceive(receive, self.seconds)
        await self.app(scope, receive, send)


class _TimedReceive:
    """``receive`` with a deadline ``seconds`` after its first call, until the body is complete."""

    def __init__(self, receive, seconds: float):
        self.receive, self.seconds = receive, seconds
        self.deadline: float | None = None
        self.body_complete = False

    async def __call__(self):
        if self.body_complete:
            return await self.receive()
        now = asyncio.get_running_loop().time()
        self.deadline = self.deadline or now + self.seconds
        try:
            message = await asyncio.wait_for(self.receive(), max(self.deadline - now, 0.0))
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.seconds:g} s",
                           code="request_timeout") from None
        self.body_complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message


def head_deadline_protocol(seconds: float, base: type | None = None) -> type:
    """uvicorn's HTTP protocol (``base``; default: httptools when installed, else h11) closing a
    connection that has no request in flight ``seconds`` after it opened or after its last
    response: a request head must arrive whole within that time (uvicorn itself waits for one
    forever once its first byte came). A request in flight is never cut; its body has
    ``BodyDeadline``."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol

    class HeadDeadlineProtocol(base):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._restart_head_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._restart_head_timer()

        def connection_lost(self, exc):
            if self._head_timer is not None:  # None if connection_made failed before setting it
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _restart_head_timer(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._head_overdue)

        def _head_overdue(self):
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

    return HeadDeadlineProtocol
