"""The generation worker: one thread per causal LM runs every request's sequence, so concurrent
requests share the model instead of queueing behind each other.

A request (``Job``) waits in a bounded queue (``QueueFull`` when it is full: the server answers
503 at once), then holds one of ``slots`` active places. On a native engine each active job owns
a KV cache slot and every round is **one batched pass** over the weights (continuous batching):
one token of every decoding job, plus up to ``PREFILL_CHUNK`` prompt tokens of the jobs still
reading their prompts, fewest tokens left first (chunked prefill: a long prompt delays the others
by one chunk per round, never by its whole length, and a short prompt never waits for a long one). Jobs join and leave between rounds. A finished job's slot keeps its
tokens' KV entries: a new job takes the free slot sharing the longest prefix with its prompt and
runs only the rest (the **prefix cache**, as many entries as slots, least recently used reused
first; usage reports ``cached_tokens``); a prompt prefix that another slot already holds (concurrent
requests with one system prompt) is copied into the job's slot rather than computed again, and a
prompt whose prefix this round computes for another waits a round to copy it. In the torch modules every round advances each job by one
token, its state carrying its cache. Each token is picked from logits adjusted per job
(``Decoding``: bias, penalties; a grammar's mask) and may report its logprobs. Text leaves in pieces that never
split a UTF-8 character (decoded as the tokens arrive, ``ReplyText``; held back while it ends in
U+FFFD) and never show the start of a stop string that may still complete. A cancelled job
(client gone) or one past its deadline is dropped before its next token. Every round's time,
sequences and tokens go to the metrics (``Metrics.observe_round``).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import numpy as np

from ..arrays import to_numpy_f32
from ..models.generation import sampler_rng
from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("rbe.serve")

#: prompt tokens a batched round runs at most (beside one token of each decoding job).
PREFILL_CHUNK = 128


#: prompt tokens another prompt of the same round would compute for a reading job, from which it
#: waits a round and copies them (``Generator._copy_shared_prefix``) instead of computing them too.
SHARED_PREFIX_MIN = 16


def _reusable(cached: Iterable[int], ids: list[int]) -> int:
    """How many leading tokens of the prompt ``ids`` a cache holding ``cached`` spares (read only
    that far): their common prefix, short of the prompt's last token (it runs, for its logits)."""
    n = 0
    for x, y in zip(cached, ids, strict=False):
        if x != y:
            break
        n += 1
    return min(n, len(ids) - 1)


class ReplyText:
    """A reply's text, decoded as its tokens arrive: equals ``tokenizer.decode(tokens)`` at every
    length that ends on a whole character, at a cost that does not grow with the reply (decoding
    the whole reply at every token: 119 µs a token over a 1,500-token reply, 371 µs over 4,000, on
    SmolLM2's tokenizer; this: 4 and 6.5 µs). Text up to the last token that ended on a whole
    character is kept and never changes; each call decodes only the tokens after it, beside the
    piece before it (``start``) so that decoders which treat a piece's start specially (a
    stripped leading space) read them in context. (Where a run of byte pieces never completes a
    character, SentencePiece's byte fallback turns the whole run into U+FFFD in a full decode;
    the reply keeps the characters it had already completed.)"""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.kept = ""  # the text of tokens[:done], ending on a whole character
        self._start = self._done = 0

    def __call__(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (the same list, grown since the last call)."""
        before = self._tok.decode(tokens[self._start:self._done], skip_special_tokens=False)
        window = self._tok.decode(tokens[self._start:], skip_special_tokens=False)
        text = self.kept + window[len(before):]
        if not text.endswith("\ufffd"):  # a whole character: keep it
            self.kept, self._start, self._done = text, self._done, len(tokens)
        return text


class QueueFull(Exception):
    """The model's queue holds ``max_queue`` waiting requests."""


@attrs.frozen
class Decoding:
    """How a job picks each token: ``bias`` (token id -> added logit), presence and frequency
    penalties on the tokens generated so far, then sampling at ``temperature`` with top-k/top-p.
    ``top_logprobs``: None for no logprobs, else how many alternatives each token reports (log
    probabilities after bias, penalties and grammar, before temperature)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    bias: dict[int, float] = attrs.Factory(dict)
    presence: float = 0.0
    frequency: float = 0.0
    top_logprobs: int | None = None


class Job:
    """One sequence to generate. ``emit(kind, *payload)`` is called from the worker thread with
    ``("text", piece, logprobs)`` (``logprobs``: a list of ``(token, logprob, [(id, logprob)...])``
    for the tokens the piece completes, empty unless asked for), then ``("done", finish_reason,
    usage)`` or ``("error", APIError)``. A ``constraint`` (``constraints.Constraint``) masks each
    step's logits; the job ends when its grammar is complete."""

    def __init__(self, ids: list[int], max_tokens: int, *, decoding: Decoding, seed: int | None,
                 stops: list[str], emit: Callable[..., None], deadline: float, constraint=None):
        self.ids, self.max_tokens = ids, max_tokens
        self.decoding, self.stops, self.constraint = decoding, stops, constraint
        self.generator = sampler_rng(seed)
        self.counts: collections.Counter[int] = collections.Counter()  # generated tokens, for the penalties
        self.logprobs: list[tuple] = []  # entries not yet emitted
        self.emit, self.deadline = emit, deadline
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.tokens: list[int] = []  # generated, EOS excluded
        self.shown = ""  # text emitted so far
        self.text: ReplyText | None = None  # set by ``Generator.submit`` (its tokenizer's)
        self.state: Any = None
        self.slot: int | None = None
        self.fed = 0  # native engine: positions of this sequence in its slot's KV cache
        self.cached = 0  # prompt tokens found in the prefix cache
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
        self._engine = native if native is not None and hasattr(native, "forward_batch") else None
        self._free_slots = list(range(self.slots)) if native is not None else None
        self._slot_tokens: dict[int, list[int]] = {}  # a free slot's cached sequence (prefix cache)
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
            job.text = ReplyText(self._tok)
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
                        self._take_slot(job)
                    self._active.append(job)
            if self._engine is not None:
                self._batched_round()
            else:
                for job in list(self._active):
                    self._tick(job)
            for job in [j for j in self._active if j.done]:
                self._active.remove(job)
                if self._free_slots is not None:
                    self._slot_tokens[job.slot] = (job.ids + job.tokens)[:job.fed]
                    self._free_slots.append(job.slot)

    def _take_slot(self, job: Job) -> None:
        """The free slot whose cached sequence shares the longest prefix with the job's prompt
        (least recently freed first among equals); the job starts after that prefix (at least
        its last prompt token runs, for its logits)."""
        def shared(slot: int) -> int:
            return _reusable(self._slot_tokens.get(slot, []), job.ids)

        best = max(self._free_slots, key=lambda s: (shared(s), -self._free_slots.index(s)))
        self._free_slots.remove(best)
        job.slot = best
        job.fed = job.cached = shared(best) if self._engine is not None else 0
        if job.cached:
            self.metrics.add("prompt_tokens_cached", job.cached)

    def _copy_shared_prefix(self, job: Job, live: list[Job]) -> None:
        """Before a reading job runs more of its prompt: the longest prefix of it that another slot
        holds (an active job's computed tokens, or a free slot's cached sequence) and it does not,
        copied into its slot (``copy_prefix``): a prompt prefix shared by concurrent requests, such
        as a chat template's system prompt, is computed once."""
        donors = [(j.slot, itertools.islice(itertools.chain(j.ids, j.tokens), j.fed)) for j in live if j is not job]
        donors += [(slot, self._slot_tokens.get(slot, [])) for slot in self._free_slots]
        slot, n = max(((s, _reusable(t, job.ids)) for s, t in donors), key=lambda d: d[1], default=(0, 0))
        if n <= job.fed:
            return
        try:
            self._engine.copy_prefix(slot, job.slot, n)
        except Exception:  # noqa: BLE001 - the job then computes the prefix itself
            log.exception("copying a shared prefix failed")
            return
        self.metrics.add("prompt_tokens_cached", n - job.cached)
        job.fed = job.cached = n

    def _expired(self, job: Job) -> bool:
        """Drop a cancelled job or one past its deadline (done, its error sent)."""
        if job.cancelled.is_set():
            job.done = True
            self.metrics.count("cancelled")
        elif time.perf_counter() > job.deadline:
            self._finish_error(job, APIError(504, "the request ran past the server's time limit", type="timeout",
                                             code="timeout"))
        return job.done

    def _batched_round(self) -> None:
        """One pass of the engine: a token of each decoding job, then up to ``PREFILL_CHUNK`` prompt
        tokens, the prompts with the fewest tokens left first (a short request that arrives during a
        long prompt is answered after one round); the jobs whose rows end a prompt or a step sample."""
        live = [job for job in self._active if not self._expired(job)]
        decoding = [job for job in live if job.fed >= len(job.ids)]
        reading = [job for job in live if job.fed < len(job.ids)]
        for job in reading:
            self._copy_shared_prefix(job, live)
        reading.sort(key=lambda job: len(job.ids) - job.fed)
        rows = [(job.slot, [job.tokens[-1]], job.fed) for job in decoding]  # the last sampled token
        owners, budget, reached = [*decoding], PREFILL_CHUNK, []
        for job in reading:
            if budget <= 0:
                break
            if any(min(_reusable(other.ids, job.ids), end) >= job.fed + SHARED_PREFIX_MIN
                   for other, end in reached):
                continue  # the next round copies what this round computes of its prompt
            chunk = job.ids[job.fed:job.fed + budget]
            budget -= len(chunk)
            rows.append((job.slot, chunk, job.fed))
            owners.append(job)
            reached.append((job, job.fed + len(chunk)))
        wanted = [pos + len(chunk) >= len(job.ids) for job, (_slot, chunk, pos) in zip(owners, rows, strict=True)]
        if not rows:
            return
        try:
            start = time.perf_counter()
            logits = self._engine.forward_batch(rows, wanted)
            self.metrics.observe_round(time.perf_counter() - start, len(rows), sum(len(chunk) for _s, chunk, _p in rows))
        except Exception as exc:  # noqa: BLE001 - a failing batch must not stop the worker
            log.exception("generation failed")
            for job in owners:
                self._finish_error(job, APIError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                                 type="server_error"))
            return
        out = zip(logits, logits.argmax(axis=1).tolist(), strict=True)  # one call for the round's greedy picks
        for job, (_slot, chunk, _pos), want in zip(owners, rows, wanted, strict=True):
            job.fed += len(chunk)
            if want:
                self._accept(job, *next(out))

    def _tick(self, job: Job) -> None:
        if self._expired(job):
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
        start, tokens = time.perf_counter(), len(job.ids) if job.state is None else 1
        if job.state is None:
            logits, job.state = model.start(job.ids, slot=job.slot) if job.slot is not None else model.start(job.ids)
        else:
            logits, job.state = model.step(job.tokens[-1], job.state)
        self.metrics.observe_round(time.perf_counter() - start, 1, tokens)
        self._accept(job, logits)

    def _accept(self, job: Job, logits, greedy: int | None = None) -> None:
        """Sample the job's next token from ``logits`` (``greedy``: their argmax, when known) and
        emit what it adds (or finish)."""
        model = self.model
        raw = to_numpy_f32(logits).reshape(-1)
        z, d = _adjusted(job, raw), job.decoding
        if greedy is not None and z is raw and d.temperature <= 0:
            token = greedy
        else:
            token = model.sample(z, d.temperature, d.top_k, d.top_p, job.generator)
        now = time.perf_counter()
        if job.last is None:
            self.metrics.observe("ttft", now - job.submitted)
        else:
            self.metrics.observe("token_latency", now - job.last)
        job.last = now
        self.metrics.add("generation_tokens", 1)
        if token in model.eos_ids:
            self._done(job, "stop", job.text(job.tokens))
            return
        if d.top_logprobs is not None:
            job.logprobs.append(_logprob_entry(z, token, d.top_logprobs))
        job.tokens.append(token)
        job.counts[token] += 1
        # a stop string ends after the text kept so far (else an earlier token would have stopped)
        start = max(0, len(job.text.kept) - max(map(len, job.stops), default=0) + 1)
        text = job.text(job.tokens)
        cut = min((i for i in (text.find(s, start) for s in job.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._done(job, "stop", text[:cut])
            return
        if job.constraint is not None:
            job.constraint.accept(token)
            if job.constraint.finished:
                self._done(job, "stop", text)
                return
        if len(job.tokens) >= job.max_tokens or len(job.ids) + len(job.tokens) >= model.context_length:
            self._done(job, "length", text)
            return
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            return
        hold = max((len(s) - 1 for s in job.stops), default=0)
        safe = text[: len(text) - hold] if hold else text
        if len(safe) > len(job.shown):
            self._show(job, safe)

    def _show(self, job: Job, text: str) -> None:
        """Emit what ``text`` adds to what the job showed, with the logprobs gathered since."""
        job.emit("text", text[len(job.shown):], job.logprobs)
        job.shown, job.logprobs = text, []

    def _done(self, job: Job, reason: str, text: str) -> None:
        text = text.rstrip("\ufffd") if reason == "length" and text.endswith("\ufffd") else text
        if len(text) > len(job.shown) or job.logprobs:
            self._show(job, max(text, job.shown, key=len))
        job.done = True
        usage = {"prompt_tokens": len(job.ids), "completion_tokens": len(job.tokens),
                 "total_tokens": len(job.ids) + len(job.tokens), "cached_tokens": job.cached}
        job.emit("done", reason, usage)


def _adjusted(job: Job, z: np.ndarray) -> np.ndarray:
    """The logits ``z`` (float32, left as they are) after the job's bias, penalties and grammar:
    ``z`` itself when there are none, else a copy."""
    d = job.decoding
    penalized = (d.presence or d.frequency) and job.counts
    if not d.bias and not penalized and job.constraint is None:
        return z
    z = z.copy()
    for token, bias in d.bias.items():
        z[token] += bias
    if penalized:
        ids = np.fromiter(job.counts.keys(), dtype=np.int64, count=len(job.counts))
        seen = np.fromiter(job.counts.values(), dtype=np.float32, count=len(job.counts))
        z[ids] -= d.frequency * seen + d.presence
    if job.constraint is not None:
        job.constraint.mask(z)
    return z


def _logprob_entry(z: np.ndarray, token: int, top: int) -> tuple:
    """``(token, its log probability, [(id, logprob)] of the ``top`` likeliest)`` under softmax(z)."""
    lp = z.astype(np.float64)
    lp -= lp.max()
    lp -= np.log(np.exp(lp).sum())
    best = np.argpartition(-lp, top)[:top] if 0 < top < lp.size else np.arange(lp.size if top else 0)
    best = best[np.argsort(-lp[best], kind="stable")]
    return token, float(lp[token]), [(int(i), float(lp[i])) for i in best]
