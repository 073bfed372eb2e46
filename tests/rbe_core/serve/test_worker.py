"""The generation worker with a scripted model and a real byte-level tokenizer: UTF-8 never split,
stop strings never shown, finish reasons, fair interleaving, cancellation, the queue bound."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from _model_helpers import byte_level_vocab, torch  # noqa: E402

from rbe_core.serve.metrics import Metrics  # noqa: E402
from rbe_core.serve.worker import Decoding, Generator, Job, QueueFull, ReplyText  # noqa: E402

EOS = 299


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens, merges = byte_level_vocab()
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_tokenizer():
    """A SentencePiece-style tokenizer (Llama 2, Mistral, Gemma): word pieces marked with ``▁``,
    bytes as ``<0xNN>`` pieces, and a decoder that strips the text's leading space."""
    from tokenizers import Tokenizer, decoders, models

    pieces = ["<unk>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "▁hello", "▁world", "he", "llo", "▁the", ".", "▁a"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(pieces)}, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def test_reply_text_is_the_decode_of_every_prefix():
    """Decoded token by token, a byte-level reply's text is the tokenizer's decode of all its
    tokens at every length: characters cut across tokens, bytes that never make a character."""
    tok = tokenizer()
    rng = np.random.default_rng(0)
    for _ in range(40):
        ids = [int(i) for i in rng.integers(0, tok.get_vocab_size(), 40)]
        for k in rng.integers(0, len(ids), 10):
            ids[k:k] = tok.encode("é你🙂").ids
        text = ReplyText(tok)
        for n in range(1, len(ids) + 1):
            assert text(ids[:n]) == tok.decode(ids[:n], skip_special_tokens=False)


def test_reply_text_of_sentencepiece_pieces_reads_each_in_context():
    """With a decoder that strips the text's leading space and turns byte pieces into characters,
    the reply's text is the decode of all its tokens wherever that ends on a whole character, and
    never changes what it already gave (a run of byte pieces that stays incomplete turns into
    U+FFFD as a whole in the full decode; the reply keeps the characters it completed)."""
    tok = sentencepiece_tokenizer()
    rng = np.random.default_rng(1)
    words = [tok.token_to_id(t) for t in ("▁", "▁hello", "▁world", "he", "llo", "▁the", ".", "▁a")]
    byte = [tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    for _ in range(40):
        run = [byte[b] for b in "é你🙂".encode()]
        ids = [t for i in rng.integers(0, len(words) + 1, 36) for t in ([words[i]] if i < len(words) else run)]
        text, seen = ReplyText(tok), ""
        for n in range(1, len(ids) + 1):
            got, full = text(ids[:n]), tok.decode(ids[:n], skip_special_tokens=False)
            if not full.endswith("\ufffd"):
                assert got == full
            assert got.startswith(text.kept) and text.kept.startswith(seen)
            seen = text.kept
        assert got == full


class Scripted:
    """A causal LM whose greedy output is ``script`` (then EOS); records the order of its steps."""

    context_length = 64
    eos_ids = {EOS}
    native = None

    def __init__(self, script: list[int], delay: float = 0.0):
        self.script, self.delay, self.calls = script, delay, []
        self.tok = tokenizer()

    def _require_tokenizer(self):
        return self.tok

    def _logits(self, i: int) -> torch.Tensor:
        out = torch.zeros(300)
        out[self.script[i] if i < len(self.script) else EOS] = 1.0
        return out

    def start(self, ids):
        self.calls.append(id(ids))
        time.sleep(self.delay)
        return self._logits(0), (id(ids), 1)

    def step(self, token, state):
        key, i = state
        self.calls.append(key)
        time.sleep(self.delay)
        return self._logits(i), (key, i + 1)

    sample = staticmethod(lambda logits, *a: int(np.argmax(logits)))


def run(model, text_or_ids, *, stops=(), max_tokens=60, generator=None):
    """Generate one job to the end: (pieces emitted, finish reason, usage)."""
    gen = generator or Generator("m", model, max_queue=4, slots=2, metrics=Metrics())
    pieces, done = [], threading.Event()
    result = {}

    def emit(kind, *payload):
        if kind == "text":
            pieces.append(payload[0])
        else:
            result["end"] = (kind, *payload)
            done.set()

    ids = [1, 2, 3] if isinstance(text_or_ids, str) else text_or_ids
    gen.submit(Job(ids, max_tokens, decoding=Decoding(temperature=0.0), seed=0, stops=list(stops), emit=emit,
                   deadline=time.perf_counter() + 30))
    assert done.wait(10)
    return pieces, result["end"]


def test_utf8_is_never_split_and_pieces_join_to_the_text():
    text = "Grüße 你好世界 🙂👍🏽 ok"
    model = Scripted(tokenizer().encode(text).ids)
    pieces, (kind, reason, usage) = run(model, "x")
    assert kind == "done" and reason == "stop" and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 3
    assert usage["completion_tokens"] == len(model.script)  # EOS not counted


def test_stop_string_is_cut_and_never_shown():
    text = "alpha beta STOP gamma"
    model = Scripted(tokenizer().encode(text).ids)
    pieces, (_, reason, _) = run(model, "x", stops=["STOP", "zzz"])
    assert reason == "stop" and "".join(pieces) == "alpha beta "
    assert not any("S" in p for p in pieces)


def test_length_finish_exactly_at_the_limit():
    model = Scripted(tokenizer().encode("one two three four five six").ids)
    pieces, (_, reason, usage) = run(model, "x", max_tokens=3)
    assert reason == "length" and usage["completion_tokens"] == 3
    assert "".join(pieces) == tokenizer().decode(model.script[:3])


def test_jobs_are_interleaved_token_by_token_and_cancel_stops_one():
    model = Scripted(list(range(40, 60)), delay=0.002)
    gen = Generator("m", model, max_queue=4, slots=2, metrics=Metrics())
    ends = {}
    a_ids, b_ids = [1, 2], [3, 4]
    both = threading.Event()

    def emitter(name):
        def emit(kind, *payload):
            if kind != "text":
                ends[name] = payload
                if len(ends) == 2:
                    both.set()
        return emit

    jobs = [Job(ids, 15, decoding=Decoding(temperature=0.0), seed=0, stops=[], emit=emitter(n),
                deadline=time.perf_counter() + 30) for n, ids in (("a", a_ids), ("b", b_ids))]
    for job in jobs:
        gen.submit(job)
    assert both.wait(10)
    order = [c for c in model.calls if c in (id(a_ids), id(b_ids))]
    switches = sum(1 for x, y in zip(order, order[1:], strict=False) if x != y)
    assert switches >= 20  # a, b, a, b, ...: neither waits for the other to finish
    # a cancelled job stops before its next token and never reports done
    model.calls.clear()
    seen = []
    job = Job([5], 1000, decoding=Decoding(temperature=0.0), seed=0, stops=[], emit=lambda *a: seen.append(a),
              deadline=time.perf_counter() + 30)
    gen.submit(job)
    time.sleep(0.02)
    job.cancel()
    time.sleep(0.05)
    n = len(model.calls)
    time.sleep(0.05)
    assert len(model.calls) == n and all(k == "text" for k, *_ in seen)


def test_full_queue_is_refused_at_once():
    model = Scripted([40] * 60, delay=0.01)
    gen = Generator("m", model, max_queue=1, slots=1, metrics=Metrics())
    jobs = [Job([1], 50, decoding=Decoding(temperature=0.0), seed=0, stops=[], emit=lambda *a: None,
                deadline=time.perf_counter() + 30) for _ in range(3)]
    gen.submit(jobs[0])
    until = time.perf_counter() + 10
    while gen.active < 1 and time.perf_counter() < until:  # the first is active (a loaded machine may take a while)
        time.sleep(0.005)
    gen.submit(jobs[1])  # the second waits, the third finds the queue full
    t0 = time.perf_counter()
    with pytest.raises(QueueFull):
        gen.submit(jobs[2])
    assert time.perf_counter() - t0 < 0.1
    for job in jobs:
        job.cancel()
    gen.stop()


def test_loading_makes_the_chat_tables_the_first_request_would(models):
    """The store builds a causal model's plain-text tokenizer (special tokens as text) at load, so
    the first chat request does not pay for it."""
    from rbe_core.serve import chat
    from rbe_core.serve.store import ModelStore

    store = ModelStore(backend=None, max_queue=2, slots=2, metrics=Metrics())
    served = store.load(models[1])
    try:
        assert served.model in chat._plain_tokenizers
    finally:
        store.unload(served.name)
