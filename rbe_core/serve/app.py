"""The FastAPI application of ``rbe serve``: OpenAI-compatible routes, health, metrics, the page.

Routes (``/v1/*`` need ``Authorization: Bearer KEY`` when the server has a key; ``/``,
``/health`` and ``/metrics`` are public):

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` as Server-Sent Events in
  the OpenAI framing, ``stream_options.include_usage``), ``POST /v1/embeddings`` (encoders);
- ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /v1/models/{id}/card``,
  ``POST /v1/models/load`` ``{"path", "name"?}``, ``POST /v1/models/unload`` ``{"model"}``;
- ``GET /health`` (503 while a model loads), ``GET /metrics`` (Prometheus), ``GET /`` (the page).

Every check (JSON, field types, the model, prompt + max_tokens against the context, the queue)
happens before the first byte of a stream; errors are ``protocol.APIError`` in the OpenAI shape.
The event loop never runs a model: generation runs in each model's worker thread, embeddings
and loads in threads of their own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import os
import socket
import sys
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import Metrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    LoadRequest,
    Sampling,
    UnloadRequest,
    parse,
)
from .store import ModelStore, Served
from .worker import Job, QueueFull

#: which server process answered (several run behind Ray Serve's proxy with ``--ray --replicas N``)
REPLICA = f"{socket.gethostname()}:{os.getpid()}"
#: completions without ``max_tokens`` generate this many (OpenAI's default); chat: the rest of the context
COMPLETION_DEFAULT_TOKENS = 16


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


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    store = ModelStore(backend=settings.backend, max_queue=settings.max_queue, slots=settings.slots, metrics=metrics)
    state = {"starting": len(settings.models) > 0, "load_errors": []}

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        async def load_all():
            try:
                for path in settings.models:
                    try:
                        await asyncio.to_thread(store.load, path)
                    except APIError as exc:  # the server stays up (models can be loaded later); say why
                        state["load_errors"].append(exc.message)
                        print(f"rbe serve: {exc.message}", file=sys.stderr, flush=True)
            finally:
                state["starting"] = False

        task = asyncio.create_task(load_all())
        if settings.load_first:
            await task
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(store.close)

    app = FastAPI(title="rbe serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.metrics, app.state.settings = store, metrics, settings
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])

    @app.middleware("http")
    async def count_and_guard(request: Request, call_next):
        path = request.url.path
        try:
            if path.startswith("/v1/") and settings.api_key is not None and request.method != "OPTIONS":
                given = request.headers.get("authorization", "")
                scheme, _, key = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
                    raise APIError(401, "missing or invalid API key (Authorization: Bearer KEY)",
                                   type="invalid_request_error", code="invalid_api_key")
            response = await call_next(request)
        except APIError as exc:
            response = _error(exc)
        route = request.scope.get("route")
        metrics.count("requests", endpoint=getattr(route, "path", "other"), status=response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return _error(APIError(exc.status_code, str(exc.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        return _error(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    async def body(request: Request) -> bytes:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_body:
            raise APIError(413, f"the request body is over {settings.max_body} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body:
                raise APIError(413, f"the request body is over {settings.max_body} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    # ---- public --------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if state["starting"] or store.loading:
            return JSONResponse({"status": "loading", "models": store.names(), "replica": REPLICA}, status_code=503)
        return {"status": "ok", "models": store.names(), "load_errors": state["load_errors"], "replica": REPLICA}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8"))

    # ---- models --------------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_object(store.get(n)) for n in store.names()]}

    @app.get("/v1/models/{name:path}/card")
    async def card(name: str):
        return store.get(name).card

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        return _model_object(store.get(name))

    @app.post("/v1/models/load")
    async def load(request: Request):
        req = parse(LoadRequest, await body(request))
        try:
            found = Path(req.path).is_file()
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte...
            raise APIError(400, f"bad path: {exc}", param="path") from None
        if not found:
            raise APIError(400, f"no such file: {req.path}", param="path")
        served = await asyncio.to_thread(store.load, req.path, req.name)
        return _model_object(served)

    @app.post("/v1/models/unload")
    async def unload(request: Request):
        req = parse(UnloadRequest, await body(request))
        store.get(req.model)
        await asyncio.to_thread(store.unload, req.model)
        return {"id": req.model, "object": "model", "deleted": True}

    # ---- generation ----------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await body(request))
        served = _causal(store, req.model)
        prompt = req.prompts()[0]
        ids = _prompt_ids(served, prompt)
        return await _generate(request, served, req, ids, chat=False, default_tokens=COMPLETION_DEFAULT_TOKENS)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse(ChatRequest, await body(request))
        served = _causal(store, req.model)
        text = served.apply_chat([{"role": m.role, "content": m.text()} for m in req.messages])
        ids = served.model._require_tokenizer().encode(text, add_special_tokens=False).ids
        if not ids:
            raise APIError(400, "the messages are empty", param="messages")
        return await _generate(request, served, req, ids, chat=True, default_tokens=None)

    async def _generate(request: Request, served: Served, req: Sampling, ids: list[int], *, chat: bool,
                        default_tokens: int | None):
        context = served.model.context_length
        room = context - len(ids)
        limit = req.limit()
        if room < 1 or (limit is not None and limit > room):
            raise APIError(400, f"the prompt is {len(ids)} tokens and max_tokens is {limit}: over the model's "
                                f"context of {context} tokens", param="max_tokens", code="context_length_exceeded")
        max_tokens = limit if limit is not None else min(room, default_tokens or room)
        stops = req.stops()
        metrics.add("prompt_tokens", len(ids) * req.n)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        deadline = time.perf_counter() + settings.timeout
        jobs = []
        for i in range(req.n):
            def emit(kind, *payload, _i=i):
                loop.call_soon_threadsafe(events.put_nowait, (_i, kind, payload))

            seed = None if req.seed is None else req.seed + i
            jobs.append(Job(ids, max_tokens, temperature=req.temperature, top_p=req.top_p, seed=seed, stops=stops,
                            emit=emit, deadline=deadline))
        try:
            for job in jobs:
                served.generator.submit(job)
        except QueueFull as exc:
            for job in jobs:
                job.cancel()
            raise APIError(503, str(exc), type="server_error", code="queue_full") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        meta = {"id": rid, "created": int(time.time()), "model": served.name}
        if req.stream:
            return StreamingResponse(_stream(events, jobs, meta, chat, req.include_usage()),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(events, jobs, meta, chat)

    # ---- embeddings ----------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req = parse(EmbeddingRequest, await body(request))
        served = store.get(req.model)
        if served.kind != "encoder":
            raise APIError(400, f"model {served.name!r} is a causal LM; embeddings need an encoder model",
                           param="model")
        texts = req.texts()
        tok = served.model._require_tokenizer()
        counts = [len(e.ids) for e in tok.encode_batch(texts)]
        limit = int(served.model.config.get("max_position", 512))
        if max(counts) > limit:
            raise APIError(400, f"an input is {max(counts)} tokens; the model takes {limit}", param="input",
                           code="context_length_exceeded")

        def run():
            import torch

            with served.lock, torch.no_grad():
                v = served.model.embed(texts).float().numpy().astype(np.float32)
            return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

        vectors = await asyncio.to_thread(run)
        metrics.add("prompt_tokens", sum(counts))
        data = []
        for i, v in enumerate(vectors):
            emb = base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": served.name,
                "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}}

    return app


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _causal(store: ModelStore, name: str) -> Served:
    served = store.get(name)
    if served.kind != "causal":
        raise APIError(400, f"model {name!r} is an encoder; use /v1/embeddings", param="model")
    return served


def _prompt_ids(served: Served, prompt) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "'prompt' is empty", param="prompt")
        return served.model._require_tokenizer().encode(prompt).ids
    vocab = int(served.model.config.get("vocab_size", 0))
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt):
        raise APIError(400, f"token ids must be integers in [0, {vocab})", param="prompt")
    return list(prompt)


def _model_object(served: Served) -> dict[str, Any]:
    card = served.card
    return {"id": served.name, "object": "model", "created": int(served.path.stat().st_mtime), "owned_by": "rbe",
            "kind": served.kind, "context_length": card["context_length"], "parameters": card["parameters"],
            "stored_bytes": card["stored_bytes"], "bits_per_weight": round(card["bits_per_weight"], 4),
            "codecs": sorted(card["codecs"]), "backend": served.backend,
            "engine": getattr(served.model, "engine_name", "torch"), "path": str(served.path)}


def _chunk(meta, chat: bool, index: int, *, text: str | None = None, role: bool = False,
           finish: str | None = None, usage=None, include_usage: bool = False) -> str:
    if chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        out = {**meta, "object": "chat.completion.chunk", "choices": [choice]}
    else:
        out = {**meta, "object": "text_completion",
               "choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}]}
    if include_usage:
        out["usage"] = usage
    return f"data: {json.dumps(out, ensure_ascii=False)}\n\n"


async def _stream(events: asyncio.Queue, jobs: list[Job], meta, chat: bool, include_usage: bool):
    """SSE: each choice's role first (chat), its text pieces, its finish; a usage chunk; [DONE]."""
    left = len(jobs)
    totals = {"prompt_tokens": len(jobs[0].ids), "completion_tokens": 0, "total_tokens": 0}
    try:
        if chat:
            for i in range(len(jobs)):
                yield _chunk(meta, chat, i, text="", role=True, include_usage=include_usage)
        while left:
            i, kind, payload = await events.get()
            if kind == "text":
                yield _chunk(meta, chat, i, text=payload[0], include_usage=include_usage)
            elif kind == "done":
                reason, usage = payload
                totals["completion_tokens"] += usage["completion_tokens"]
                yield _chunk(meta, chat, i, finish=reason, include_usage=include_usage)
                left -= 1
            else:
                yield f"data: {json.dumps(payload[0].body())}\n\n"
                left -= 1
        if include_usage:
            totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
            usage_chunk = {**meta, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
                           "usage": totals}
            yield f"data: {json.dumps(usage_chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): stop what still runs
        for job in jobs:
            job.cancel()


async def _collect(events: asyncio.Queue, jobs: list[Job], meta, chat: bool) -> Response:
    texts = [""] * len(jobs)
    reasons: list[str | None] = [None] * len(jobs)
    completion = 0
    left = len(jobs)
    try:
        while left:
            i, kind, payload = await events.get()
            if kind == "text":
                texts[i] += payload[0]
            elif kind == "done":
                reasons[i] = payload[0]
                completion += payload[1]["completion_tokens"]
                left -= 1
            else:
                raise payload[0]
    finally:
        for job in jobs:
            job.cancel()
    prompt = len(jobs[0].ids)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": usage})
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
               for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
    return JSONResponse({**meta, "object": "text_completion", "choices": choices, "usage": usage})
