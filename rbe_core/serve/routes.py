"""The routes besides generation: ``/health``, ``/metrics`` and ``/`` (public), model management
(``/v1/models...``), ``/v1/embeddings``; and the bounded request-body reader every POST uses.

Each ``add_*`` function registers its routes on the app in the order given (the matching order:
``/v1/models/{id}/card`` before ``/v1/models/{id}``). ``app.create_app`` calls them.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import attrs
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from ..arrays import to_numpy_f32
from .metrics import Metrics
from .protocol import APIError, EmbeddingRequest, LoadRequest, UnloadRequest, parse
from .store import ModelStore, Served

#: which server process answered (several run behind Ray Serve's proxy with ``--ray --replicas N``)
REPLICA = f"{socket.gethostname()}:{os.getpid()}"

R = TypeVar("R", bound=BaseModel)


@attrs.define
class Startup:
    """The loading of ``Settings.models`` as ``/health`` reports it: ``starting`` until each path
    was tried; ``load_errors`` the messages of those that failed."""

    starting: bool
    load_errors: list[str] = attrs.Factory(list)


async def parse_body(model: type[R], request: Request, max_body: int) -> R:
    """The request's body parsed as ``model`` (``protocol.parse``: 400 naming the bad field);
    413 ``request_too_large`` first if its Content-Length or its bytes exceed ``max_body``; 499
    ``client_closed_request`` if the client hung up before sending all of it."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body:
        raise _too_large(max_body)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise _too_large(max_body)
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(499, "the client closed the connection before sending the whole body",
                       code="client_closed_request") from None
    return parse(model, b"".join(chunks))


def _too_large(max_body: int) -> APIError:
    return APIError(413, f"the request body is over {max_body} bytes", code="request_too_large")


def add_public_routes(app: FastAPI, store: ModelStore, metrics: Metrics, startup: Startup) -> None:
    """``GET /health`` (503 ``loading`` while ``startup`` runs or the store loads a model, else 200
    ``ok`` with the load errors), ``GET /metrics`` (Prometheus text), ``GET /`` (the page)."""

    @app.get("/health")
    async def health():
        if startup.starting or store.loading:
            return JSONResponse({"status": "loading", "models": store.names(), "replica": REPLICA}, status_code=503)
        return {"status": "ok", "models": store.names(), "load_errors": startup.load_errors, "replica": REPLICA}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8"))


def add_model_routes(app: FastAPI, store: ModelStore, max_body: int, models_dir: Path | None) -> None:
    """``GET /v1/models``, ``/v1/models/{id}/card``, ``/v1/models/{id}`` (404 for an unknown id,
    from the store); ``POST /v1/models/load`` (403 ``model_loading_disabled`` when ``models_dir``
    is None, else a file inside the resolved ``models_dir`` only: ``model_file``; loads in a
    thread) and ``POST /v1/models/unload`` (404 unless loaded)."""

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
        if models_dir is None:
            raise APIError(403, "loading models over HTTP is off (start rbe serve with --models-dir DIR to load from DIR)",
                           code="model_loading_disabled")
        req = await parse_body(LoadRequest, request, max_body)
        path = await asyncio.to_thread(model_file, models_dir, req.path)
        served = await asyncio.to_thread(store.load, path, req.name)
        return _model_object(served)

    @app.post("/v1/models/unload")
    async def unload(request: Request):
        req = await parse_body(UnloadRequest, request, max_body)
        store.get(req.model)
        await asyncio.to_thread(store.unload, req.model)
        return {"id": req.model, "object": "model", "deleted": True}


def model_file(models_dir: Path, requested: str) -> Path:
    """The regular, readable file ``requested`` names inside ``models_dir`` (a resolved path;
    ``requested`` relative to it or absolute), with symlinks and ``..`` resolved. Anything else (a
    path resolving outside, a missing file, a directory, an unreadable file, a malformed name) is
    the same 404 ``model_not_found``, so an answer tells nothing about paths outside."""
    not_found = APIError(404, f"no model file {requested!r} in the models directory", param="path",
                         code="model_not_found")
    try:
        path = (models_dir / requested).resolve(strict=True)
        inside = path.is_relative_to(models_dir) and path.is_file() and os.access(path, os.R_OK)
    except (OSError, ValueError, RuntimeError):  # missing, a NUL byte, a name too long, a symlink loop
        raise not_found from None
    if not inside:
        raise not_found
    return path


def _model_object(served: Served) -> dict[str, Any]:
    """A served model in the OpenAI ``model`` shape, with rbe's own fields from its card."""
    card = served.card
    return {"id": served.name, "object": "model", "created": int(served.path.stat().st_mtime), "owned_by": "rbe",
            "kind": served.kind, "context_length": card["context_length"], "parameters": card["parameters"],
            "stored_bytes": card["stored_bytes"], "bits_per_weight": round(card["bits_per_weight"], 4),
            "codecs": sorted(card["codecs"]), "backend": served.backend,
            "engine": getattr(served.model, "engine_name", "torch"), "path": str(served.path)}


def add_embedding_routes(app: FastAPI, store: ModelStore, metrics: Metrics, max_body: int) -> None:
    """``POST /v1/embeddings``: an encoder model only (400 for a causal LM), each input within
    ``max_position`` tokens (400), ``dimensions`` absent or the model's width (400 otherwise:
    the served encoders were not trained for shortened embeddings), unit vectors as floats or
    base64 little-endian float32; counts the inputs' tokens as ``prompt_tokens``."""

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req = await parse_body(EmbeddingRequest, request, max_body)
        served = store.get(req.model)
        if served.kind != "encoder":
            raise APIError(400, f"model {served.name!r} is a causal LM; embeddings need an encoder model",
                           param="model")
        width = int(served.model.config["hidden_size"])
        if req.dimensions is not None and req.dimensions != width:
            raise APIError(400, f"'dimensions' must be {width}: {served.name!r} gives {width}-wide embeddings "
                           "and was not trained for shorter ones", param="dimensions")
        texts = req.texts()
        counts = [len(e.ids) for e in served.model._require_tokenizer().encode_batch(texts)]
        limit = int(served.model.config.get("max_position", 512))
        if max(counts) > limit:
            raise APIError(400, f"an input is {max(counts)} tokens; the model takes {limit}", param="input",
                           code="context_length_exceeded")
        vectors = await asyncio.to_thread(_embed, served, texts)
        metrics.add("prompt_tokens", sum(counts))
        data = []
        for i, v in enumerate(vectors):
            emb = base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": served.name,
                "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}}


def _embed(served: Served, texts: list[str]) -> np.ndarray:
    """``texts`` embedded by ``served`` (under its lock), each row scaled to unit length."""
    with served.lock:
        v = to_numpy_f32(served.model.embed(texts))
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
