"""The generation worker: one thread per causal LM runs every request's sequence, token by token
in turn, so concurrent requests share the model fairly instead of queueing behind each other.

A request (``Job``) waits in a bounded queue (``QueueFull`` when it is full: the server answers
503 at once), then holds one of ``slots`` active places; on the native engine each active job
owns a KV cache slot (``NativeDecoder.slots``), in the torch modules its state carries its cache.
Every round advances each active job by one token (its prompt first), so a job's time to first
token is its prefill plus at most one token of each other job. Text leaves in pieces that never
split a UTF-8 character (the tokenizer's decode of all new tokens, held back while it ends in
U+FFFD) and never show the start of a stop string that may still complete. A cancelled job
(client gone) or one past its deadline is dropped before its next token.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..models.generation import sampler_rng
from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("rbe.serve")


class QueueFull(Exception):
    """The model's queue holds ``max_queue`` waiting requests."""


class Job:
    """One sequence to generate. ``emit(kind, *payload)`` is called from the worker thread with
    ``("text", piece)``, then ``("done", finish_reason, usage)`` or ``("error", APIError)``."""

    def __init__(self, ids: list[int], max_tokens: int, *, temperature: float, top_p: float, seed: int | None,
                 stops: list[str], emit: Callable[..., None], deadline: float):
        self.ids, self.max_tokens = ids, max_tokens
        self.temperature, self.top_p, self.stops = temperature, top_p, stops
        self.generator = sampler_rng(seed)
        self.emit, self.deadline = emit, deadline
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.tokens: list[int] = []  # generated, EOS excluded
        self.shown = ""  # text emitted so far
        self.state: Any = None
        self.slot: int | None = None
        self.last: float | None = None
        self.done = False

    def cancel(self) -> None:
        self.cancelled.set()


class Generator:
    """The worker of one causal LM (see the module docstring)."""

    def __init__(self, name: str, model, *, max_queue: int, slots: int, metrics: Metrics):
        self.name, self.model, self.metrics = name, model, metrics
        self.max_queue = max_queue
        native = getattr(model, "native", None)
        self.slots = max(1, min(slots, native.slots if native is not None else slots))
        self._free_slots = list(range(self.slots)) if native is not None else None
        self._tok = model._require_tokenizer()
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"rbe-serve-{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopped:
                raise APIError(503, f"model {self.name!r} is being unloaded", type="server_error")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue of model {self.name!r} is full ({self.max_queue} waiting)")
            self._pending.append(job)
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the active and queued jobs, then end the thread (at most ``timeout`` seconds)."""
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._active and not self._stopped:
                    self._cv.wait()
                if self._stopped and not self._pending and not self._active:
                    return
                while self._pending and len(self._active) < self.slots:
                    job = self._pending.popleft()
                    if self._free_slots is not None:
                        job.slot = self._free_slots.pop()
                    self._active.append(job)
            for job in list(self._active):
                self._tick(job)
                if job.done:
                    self._active.remove(job)
                    if self._free_slots is not None:
                        self._free_slots.append(job.slot)

    def _tick(self, job: Job) -> None:
        if job.cancelled.is_set():
            job.done = True
            self.metrics.count("cancelled")
            return
        if time.perf_counter() > job.deadline:
            self._finish_error(job, APIError(504, "the request ran past the server's time limit", type="timeout",
                                             code="timeout"))
            return
        try:
            self._advance(job)
        except Exception as exc:  # noqa: BLE001 - a failing request must not stop the worker
            log.exception("generation failed")
            self._finish_error(job, APIError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                             type="server_error"))

    def _finish_error(self, job: Job, err: APIError) -> None:
        job.done = True
        job.emit("error", err)

    def _advance(self, job: Job) -> None:
        model = self.model
        if job.state is None:
            logits, job.state = model.start(job.ids, slot=job.slot) if job.slot is not None else model.start(job.ids)
        else:
            logits, job.state = model.step(job.tokens[-1], job.state)
        token = model.sample(logits, job.temperature, 0, job.top_p, job.generator)
        now = time.perf_counter()
        if job.last is None:
            self.metrics.observe("ttft", now - job.submitted)
        else:
            self.metrics.observe("token_latency", now - job.last)
        job.last = now
        self.metrics.add("generation_tokens", 1)
        if token in model.eos_ids:
            self._done(job, "stop", self._text(job))
            return
        job.tokens.append(token)
        text = self._text(job)
        cut = min((i for i in (text.find(s) for s in job.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._done(job, "stop", text[:cut])
            return
        if len(job.tokens) >= job.max_tokens or len(job.ids) + len(job.tokens) >= model.context_length:
            self._done(job, "length", text)
            return
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            return
        hold = max((len(s) - 1 for s in job.stops), default=0)
        safe = text[: len(text) - hold] if hold else text
        if len(safe) > len(job.shown):
            job.emit("text", safe[len(job.shown):])
            job.shown = safe

    def _text(self, job: Job) -> str:
        return self._tok.decode(job.tokens, skip_special_tokens=False)

    def _done(self, job: Job, reason: str, text: str) -> None:
        text = text.rstrip("\ufffd") if reason == "length" and text.endswith("\ufffd") else text
        if len(text) > len(job.shown):
            job.emit("text", text[len(job.shown):])
            job.shown = text
        job.done = True
        usage = {"prompt_tokens": len(job.ids), "completion_tokens": len(job.tokens),
                 "total_tokens": len(job.ids) + len(job.tokens)}
        job.emit("done", reason, usage)
