"""``POST /v1/completions`` and ``POST /v1/chat/completions``: every check before the first byte,
then the choices generated in the model's worker thread, answered whole or as Server-Sent Events
in the OpenAI framing (``stream_options.include_usage``)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, Sampling
from .routes import parse_body
from .store import ModelStore, Served
from .worker import Job, QueueFull

#: completions without ``max_tokens`` generate this many (OpenAI's default); chat: the rest of the context
COMPLETION_DEFAULT_TOKENS = 16


def add_generation_routes(app: FastAPI, store: ModelStore, metrics: Metrics, *, max_body: int,
                          timeout: float) -> None:
    """The two generation routes on causal LMs (400 for an encoder): a completion's one prompt
    (text or token ids), a chat's messages through the model's chat template. Each request's
    choices share a deadline ``timeout`` seconds away."""

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse_body(CompletionRequest, request, max_body)
        served = _causal(store, req.model)
        ids = _prompt_ids(served, req.prompts()[0])
        return await _generate(served, req, ids, metrics, timeout, chat=False, default_tokens=COMPLETION_DEFAULT_TOKENS)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse_body(ChatRequest, request, max_body)
        served = _causal(store, req.model)
        text = served.apply_chat([{"role": m.role, "content": m.text()} for m in req.messages])
        ids = served.model._require_tokenizer().encode(text, add_special_tokens=False).ids
        if not ids:
            raise APIError(400, "the messages are empty", param="messages")
        return await _generate(served, req, ids, metrics, timeout, chat=True, default_tokens=None)


def _causal(store: ModelStore, name: str) -> Served:
    """The loaded model ``name`` (404 if none), which must be a causal LM (else 400)."""
    served = store.get(name)
    if served.kind != "causal":
        raise APIError(400, f"model {name!r} is an encoder; use /v1/embeddings", param="model")
    return served


def _prompt_ids(served: Served, prompt) -> list[int]:
    """A completion prompt as token ids: text tokenized (400 if empty), ids checked against the vocabulary."""
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "'prompt' is empty", param="prompt")
        return served.model._require_tokenizer().encode(prompt).ids
    vocab = int(served.model.config.get("vocab_size", 0))
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt):
        raise APIError(400, f"token ids must be integers in [0, {vocab})", param="prompt")
    return list(prompt)


def _max_tokens(served: Served, req: Sampling, n_prompt: int, default_tokens: int | None) -> int:
    """How many tokens each choice may generate: the request's limit (400 ``context_length_exceeded``
    past the context), else ``default_tokens`` capped by the room left (all of it for ``None``)."""
    context = served.model.context_length
    room = context - n_prompt
    limit = req.limit()
    if room < 1 or (limit is not None and limit > room):
        raise APIError(400, f"the prompt is {n_prompt} tokens and max_tokens is {limit}: over the model's "
                            f"context of {context} tokens", param="max_tokens", code="context_length_exceeded")
    return limit if limit is not None else min(room, default_tokens or room)


async def _generate(served: Served, req: Sampling, ids: list[int], metrics: Metrics, timeout: float, *,
                    chat: bool, default_tokens: int | None) -> Response:
    """Submits ``req.n`` jobs on ``ids`` (seeds ``seed + i``) to the model's worker (all or none:
    503 ``queue_full``) and answers them streamed or collected; their events arrive on this loop."""
    max_tokens = _max_tokens(served, req, len(ids), default_tokens)
    stops = req.stops()
    metrics.add("prompt_tokens", len(ids) * req.n)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    deadline = time.perf_counter() + timeout
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


def _chunk(meta, chat: bool, index: int, *, text: str | None = None, role: bool = False,
           finish: str | None = None, usage=None, include_usage: bool = False) -> str:
    """One SSE event for choice ``index``: a chat delta (role, text) or a completion's text, its
    finish reason; ``usage`` (null until the end) on every chunk when ``include_usage``."""
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
    totals = {"prompt_tokens": len(jobs[0].ids), "completion_tokens": 0, "total_tokens": 0,
              "prompt_tokens_details": {"cached_tokens": 0}}
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
                cached = max(totals["prompt_tokens_details"]["cached_tokens"], usage["cached_tokens"])
                totals["prompt_tokens_details"]["cached_tokens"] = cached
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
    """The whole answer once every choice is done; a job's error is raised (and every job cancelled)."""
    texts = [""] * len(jobs)
    reasons: list[str | None] = [None] * len(jobs)
    completion = cached = 0
    left = len(jobs)
    try:
        while left:
            i, kind, payload = await events.get()
            if kind == "text":
                texts[i] += payload[0]
            elif kind == "done":
                reasons[i] = payload[0]
                completion += payload[1]["completion_tokens"]
                cached = max(cached, payload[1]["cached_tokens"])
                left -= 1
            else:
                raise payload[0]
    finally:
        for job in jobs:
            job.cancel()
    prompt = len(jobs[0].ids)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "prompt_tokens_details": {"cached_tokens": cached}}
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": usage})
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
               for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
    return JSONResponse({**meta, "object": "text_completion", "choices": choices, "usage": usage})
