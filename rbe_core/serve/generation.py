"""``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /tokenize`` and ``POST /detokenize``:
every check before the first byte, then the choices generated in the model's worker thread,
answered whole or as Server-Sent Events in the OpenAI framing (``stream_options.include_usage``).

A completions request may carry several prompts (choice ``i * n + j`` is prompt ``i``'s ``j``-th);
``logprobs`` come in OpenAI's shape for each endpoint; a chat's ``response_format`` and ``tools``
constrain its reply through ``constraints`` (tool calls answered as ``tool_calls``, their
arguments streamed as they are written). A non-streamed request whose client disconnects is cancelled like a stream.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .chat import chat_ids
from .constraints import (
    CallStream,
    Constraint,
    OutputSpec,
    check_grammar,
    output_spec,
    split_tool_calls,
    tokenizer_for,
)
from .metrics import Metrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Sampling,
    TokenizeRequest,
)
from .routes import parse_body
from .store import ModelStore, Served
from .worker import Decoding, Job, QueueFull

#: completions without ``max_tokens`` generate this many (OpenAI's default); chat: the rest of the context
COMPLETION_DEFAULT_TOKENS = 16


def add_generation_routes(app: FastAPI, store: ModelStore, metrics: Metrics, *, max_body: int,
                          timeout: float) -> None:
    """The generation routes on causal LMs (400 for an encoder) and the tokenizer routes: a
    completion's prompts (texts or token ids), a chat's messages through the model's chat template.
    Each request's choices share a deadline ``timeout`` seconds away."""

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse_body(CompletionRequest, request, max_body)
        served = _causal(store, req.model)
        prompts = [_prompt_ids(served, p) for p in req.prompts()]
        return await _generate(request, served, req, prompts, OutputSpec(), metrics, timeout, chat=False,
                               default_tokens=COMPLETION_DEFAULT_TOKENS)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse_body(ChatRequest, request, max_body)
        served = _causal(store, req.model)
        spec = output_spec(req.response_format, req.tools, req.tool_choice, req.parallel_tool_calls)
        ids = chat_ids(served, req.messages, spec.tools)
        return await _generate(request, served, req, [ids], spec, metrics, timeout, chat=True, default_tokens=None)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await parse_body(TokenizeRequest, request, max_body)
        served = store.get(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give one of 'prompt' and 'messages'", param="prompt")
        if req.messages is not None:
            ids = chat_ids(_causal(store, req.model), req.messages)
        else:
            ids = served.model._require_tokenizer().encode(req.prompt, add_special_tokens=req.add_special_tokens).ids
        return {"count": len(ids), "max_model_len": _context(served), "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await parse_body(DetokenizeRequest, request, max_body)
        served = store.get(req.model)
        _check_ids(served, req.tokens, "tokens")
        return {"prompt": served.model._require_tokenizer().decode(req.tokens, skip_special_tokens=False)}


def _causal(store: ModelStore, name: str) -> Served:
    """The loaded model ``name`` (404 if none), which must be a causal LM (else 400)."""
    served = store.get(name)
    if served.kind != "causal":
        raise APIError(400, f"model {name!r} is an encoder; use /v1/embeddings", param="model")
    return served


def _context(served: Served) -> int:
    return served.model.context_length if served.kind == "causal" else int(served.model.config.get("max_position", 512))


def _check_ids(served: Served, ids: list, param: str) -> None:
    """400 unless every id in ``ids`` is an integer token id of the model's vocabulary."""
    vocab = int(served.model.config.get("vocab_size", 0))
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
        raise APIError(400, f"token ids must be integers in [0, {vocab})", param=param)


def _prompt_ids(served: Served, prompt) -> list[int]:
    """A completion prompt as token ids: text tokenized (400 if empty), ids checked against the vocabulary."""
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "'prompt' is empty", param="prompt")
        return served.model._require_tokenizer().encode(prompt).ids
    if not prompt:
        raise APIError(400, "'prompt' is empty", param="prompt")
    _check_ids(served, prompt, "prompt")
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


def _decoding(served: Served, req: Sampling) -> Decoding:
    return Decoding(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                    bias=req.biases(int(served.model.config["vocab_size"])), presence=req.presence_penalty,
                    frequency=req.frequency_penalty, top_logprobs=req.top_logprobs_wanted())


async def _generate(request: Request, served: Served, req: Sampling, prompts: list[list[int]], spec: OutputSpec,
                    metrics: Metrics, timeout: float, *, chat: bool, default_tokens: int | None) -> Response:
    """Submits ``req.n`` jobs per prompt (seeds ``seed + i``) to the model's worker (all or none:
    503 ``queue_full``) and answers them streamed or collected; their events arrive on this loop."""
    limits = [_max_tokens(served, req, len(ids), default_tokens) for ids in prompts]
    stops, decoding = req.stops(), _decoding(served, req)
    lltok = None
    if spec.grammar is not None:
        lltok = await asyncio.to_thread(tokenizer_for, served.model)
        check_grammar(spec.grammar, lltok, "tools" if spec.calls else "response_format")
    metrics.add("prompt_tokens", sum(len(ids) for ids in prompts) * req.n)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    deadline = time.perf_counter() + timeout
    jobs = []
    for p, (ids, limit) in enumerate(zip(prompts, limits, strict=True)):
        for j in range(req.n):
            i = p * req.n + j

            def emit(kind, *payload, _i=i):
                loop.call_soon_threadsafe(events.put_nowait, (_i, kind, payload))

            jobs.append(Job(ids, limit, decoding=decoding, seed=None if req.seed is None else req.seed + i,
                            stops=stops, emit=emit, deadline=deadline,
                            constraint=None if lltok is None else Constraint(lltok, spec.grammar)))
    try:
        for job in jobs:
            served.generator.submit(job)
    except QueueFull as exc:
        for job in jobs:
            job.cancel()
        raise APIError(503, str(exc), type="server_error", code="queue_full") from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    answer = _Answer({"id": rid, "created": int(time.time()), "model": served.name}, chat, spec.calls,
                     served.model._require_tokenizer(), sum(len(ids) for ids in prompts))
    if req.stream:
        return StreamingResponse(_stream(events, jobs, answer, req.include_usage()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(request, events, jobs, answer)


class _Answer:
    """The shapes of one request's answer: chunks, choices, logprobs and usage, per endpoint."""

    def __init__(self, meta: dict, chat: bool, calls: bool, tokenizer, prompt_tokens: int):
        self.meta, self.chat, self.calls, self.tok = meta, chat, calls, tokenizer
        self.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": 0,
                      "prompt_tokens_details": {"cached_tokens": 0}}

    def count(self, usage: dict) -> None:
        """Add a finished choice's usage."""
        self.usage["completion_tokens"] += usage["completion_tokens"]
        details = self.usage["prompt_tokens_details"]
        details["cached_tokens"] = max(details["cached_tokens"], usage["cached_tokens"])
        self.usage["total_tokens"] = self.usage["prompt_tokens"] + self.usage["completion_tokens"]

    def chunk(self, index: int, *, text: str | None = None, role: bool = False, logprobs=None, calls=None,
              finish: str | None = None, include_usage: bool = False) -> str:
        """One SSE event for choice ``index``: a chat delta (role, text, ``tool_calls`` deltas as
        ``CallStream`` gives them) or a completion's
        text, its logprobs and finish reason; ``usage`` null on every chunk when ``include_usage``."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = calls
            choice = {"index": index, "delta": delta, "logprobs": self.logprobs(logprobs), "finish_reason": finish}
            out = {**self.meta, "object": "chat.completion.chunk", "choices": [choice]}
        else:
            out = {**self.meta, "object": "text_completion",
                   "choices": [{"index": index, "text": text or "", "logprobs": self.logprobs(logprobs),
                                "finish_reason": finish}]}
        if include_usage:
            out["usage"] = None
        return f"data: {json.dumps(out, ensure_ascii=False)}\n\n"

    def usage_chunk(self) -> str:
        out = {**self.meta, "object": "chat.completion.chunk" if self.chat else "text_completion", "choices": [],
               "usage": self.usage}
        return f"data: {json.dumps(out)}\n\n"

    def logprobs(self, entries: list | None, offset: int = 0):
        """``entries`` (``worker.Job``'s) in OpenAI's shape: chat ``{"content": [...]}``, completions
        ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``; None when not asked for."""
        if entries is None:
            return None
        if self.chat:
            return {"content": [{**self._token(t, lp), "top_logprobs": [self._token(i, v) for i, v in top]}
                                for t, lp, top in entries], "refusal": None}
        texts = [self._text(t) for t, _, _ in entries]
        offsets = [offset + sum(len(x) for x in texts[:k]) for k in range(len(texts))]
        return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self._text(i): v for i, v in top} for _, _, top in entries], "text_offset": offsets}

    def _text(self, token: int) -> str:
        return self.tok.decode([token], skip_special_tokens=False)

    def _token(self, token: int, logprob: float) -> dict:
        text = self._text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    def choice(self, index: int, text: str, reason: str | None, entries: list | None) -> dict:
        """A whole choice: a chat message (with ``tool_calls`` split out when tools are on) or a text."""
        if not self.chat:
            return {"index": index, "text": text, "logprobs": self.logprobs(entries), "finish_reason": reason}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.calls:
            message["content"], calls = split_tool_calls(text)
            if calls:
                message["tool_calls"] = calls
                reason = "tool_calls" if reason == "stop" else reason
        return {"index": index, "message": message, "logprobs": self.logprobs(entries), "finish_reason": reason}


async def _stream(events: asyncio.Queue, jobs: list[Job], answer: _Answer, include_usage: bool):
    """SSE: each choice's role first (chat), its text pieces, its finish; a usage chunk; [DONE].
    With tools on, each reply goes through a ``CallStream``: text that may still become a tool call
    waits, a call's arguments stream as the model writes them."""
    left, n = len(jobs), len(jobs)
    parsers = [CallStream() if answer.calls else None for _ in range(n)]
    want_logprobs = jobs[0].decoding.top_logprobs is not None
    pending: list[list] = [[] for _ in range(n)]  # logprobs of text not sent yet

    def send(i: int, text: str | None, calls: list) -> str:
        logprobs, pending[i] = pending[i], []
        return answer.chunk(i, text=text, calls=calls, logprobs=logprobs if want_logprobs else None,
                            include_usage=include_usage)

    try:
        if answer.chat:
            for i in range(n):
                yield answer.chunk(i, text="", role=True, include_usage=include_usage)
        while left:
            i, kind, payload = await events.get()
            if kind == "text":
                piece, entries = payload
                pending[i] += entries
                text, calls = parsers[i].feed(piece) if parsers[i] else (piece, [])
                if text or calls:
                    yield send(i, text or None, calls)
            elif kind == "done":
                reason, usage = payload
                answer.count(usage)
                if parsers[i]:
                    text, calls = parsers[i].finish()
                    if text or calls:
                        yield send(i, text, calls)
                    reason = "tool_calls" if parsers[i].calls and reason == "stop" else reason
                yield answer.chunk(i, finish=reason, include_usage=include_usage)
                left -= 1
            else:
                yield f"data: {json.dumps(payload[0].body())}\n\n"
                left -= 1
        if include_usage:
            yield answer.usage_chunk()
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): stop what still runs
        for job in jobs:
            job.cancel()


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed its connection (the body was read before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, events: asyncio.Queue, jobs: list[Job], answer: _Answer) -> Response:
    """The whole answer once every choice is done; a job's error is raised (and every job
    cancelled); a client that disconnects cancels every job."""
    n, left = len(jobs), len(jobs)
    texts, reasons = [""] * n, [None] * n
    entries: list[list] = [[] for _ in range(n)]
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while left:
            got = asyncio.ensure_future(events.get())
            await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not got.done():
                got.cancel()
                return Response(status_code=499)  # nobody reads it; the jobs stop in the finally
            i, kind, payload = got.result()
            if kind == "text":
                texts[i] += payload[0]
                entries[i] += payload[1]
            elif kind == "done":
                reasons[i] = payload[0]
                answer.count(payload[1])
                left -= 1
            else:
                raise payload[0]
    finally:
        gone.cancel()
        for job in jobs:
            job.cancel()
    logprobs = jobs[0].decoding.top_logprobs is not None
    choices = [answer.choice(i, texts[i], reasons[i], entries[i] if logprobs else None) for i in range(n)]
    return JSONResponse({**answer.meta, "object": "chat.completion" if answer.chat else "text_completion",
                         "choices": choices, "usage": answer.usage})
