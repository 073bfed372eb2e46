"""The worker on a native engine: continuous batching (each job's tokens equal the job run alone,
rounds carry several sequences), chunked prefill (a long prompt never stalls a decoding job for
more than one chunk, nor a short prompt that came after it), the prefix cache (reused KV, ``cached_tokens``, the same output)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from _model_helpers import tiny_llama, torch  # noqa: E402
from test_worker import tokenizer  # noqa: E402

import rbe_core  # noqa: E402
from rbe_core.serve import worker  # noqa: E402
from rbe_core.serve.metrics import Metrics  # noqa: E402
from rbe_core.serve.worker import Decoding, Generator, Job  # noqa: E402

pytest.importorskip("rbe_backends.cffi")


@pytest.fixture(scope="module")
def native_model(tmp_path_factory):
    """A tiny Llama with a tokenizer on the cffi engine (exact float32 arithmetic: a batch of
    several rows and one row then compute the same logits up to rounding)."""
    from rbe_backends.cffi import library

    if library.lib is None:
        pytest.skip("the cffi backend is not built")
    d = tmp_path_factory.mktemp("batching")
    ref = tiny_llama(hidden_size=128, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=256)
    ref.save_pretrained(d / "hf")
    tokenizer().save(str(d / "hf" / "tokenizer.json"))
    path = rbe_core.compress_model(d / "hf", d / "m.rbe", codec="int4", progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBE_ENGINE_ACT", "f32")
        mp.setenv("RBE_ENGINE_KV", "f32")
        from rbe_core.models.loading import load_inference

        model = load_inference(path, "cffi", engine="native")
    assert model.engine_name == "native"
    return model


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 299, (length,), generator=g).tolist() for _ in range(n)]


def _submit(gen: Generator, ids: list[int], max_tokens: int, results: dict, key, done: threading.Event,
            count: int) -> Job:
    def emit(kind, *payload):
        if kind != "text":
            results[key] = (kind, *payload)
            if len(results) == count:
                done.set()

    job = Job(ids, max_tokens, decoding=Decoding(temperature=0.0), seed=0, stops=[], emit=emit,
              deadline=time.perf_counter() + 60)
    gen.submit(job)
    return job


def _run(gen: Generator, prompts: list[list[int]], max_tokens: int) -> dict:
    results: dict = {}
    done = threading.Event()
    jobs = [_submit(gen, p, max_tokens, results, k, done, len(prompts)) for k, p in enumerate(prompts)]
    assert done.wait(60)
    return {k: (results[k], jobs[k].tokens) for k in results}


def _recording(model, monkeypatch) -> list[list[tuple]]:
    """Every forward_batch call's rows, as (slot, token count, position)."""
    calls: list[list[tuple]] = []
    engine = model.native
    real = engine.forward_batch

    def record(rows, want=None):
        calls.append([(s, len(t), p) for s, t, p in rows])
        return real(rows, want)

    monkeypatch.setattr(engine, "forward_batch", record)
    return calls


def test_concurrent_jobs_are_batched_and_each_equals_alone(native_model, monkeypatch):
    prompts = _prompts(6, 7, seed=1)
    alone = {k: _run(Generator("m", native_model, max_queue=8, slots=8, metrics=Metrics()), [p], 12)[0][1]
             for k, p in enumerate(prompts)}
    calls = _recording(native_model, monkeypatch)
    metrics = Metrics()
    together = _run(Generator("m", native_model, max_queue=8, slots=8, metrics=metrics), prompts, 12)
    for k in range(len(prompts)):
        assert together[k][1] == alone[k], k
        assert together[k][0][0] == "done"
    assert max(len({s for s, _n, _p in rows}) for rows in calls) >= 4  # one pass, several sequences
    assert len(calls) < sum(len(t) for _r, t in together.values())
    # /metrics shows the batching: every round, its sequences and its tokens
    text = metrics.render()
    sequences, tokens = _histogram(text, "rbe_engine_round_sequences"), _histogram(text, "rbe_engine_round_tokens")
    assert sequences["count"] == tokens["count"] == _histogram(text, "rbe_engine_round_seconds")["count"] == len(calls)
    assert sequences["sum"] == sum(len(rows) for rows in calls)
    assert tokens["sum"] == sum(n for rows in calls for _s, n, _p in rows)
    assert sequences["count"] - sequences["2"] == sum(len(rows) > 2 for rows in calls) > 0


def _histogram(text: str, name: str) -> dict[str, float]:
    """A Prometheus histogram's cumulative buckets by bound, with its "sum" and "count"."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{le="):
            out[line.split('"')[1]] = float(line.split()[-1])
        elif line.startswith((name + "_sum ", name + "_count ")):
            out[line.split()[0].rsplit("_", 1)[1]] = float(line.split()[-1])
    return out


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(native_model, monkeypatch):
    monkeypatch.setattr(worker, "PREFILL_CHUNK", 8)
    calls = _recording(native_model, monkeypatch)
    gen = Generator("m", native_model, max_queue=8, slots=8, metrics=Metrics())
    results: dict = {}
    short = _submit(gen, _prompts(1, 3, seed=2)[0], 250, results, "short", threading.Event(), 2)
    while not short.tokens:
        time.sleep(0.001)
    long_done = threading.Event()
    _submit(gen, _prompts(1, 60, seed=3)[0], 2, results, "long", long_done, 1)
    assert long_done.wait(60)
    short.cancel()
    short_slot = calls[0][0][0]
    long_rounds = [rows for rows in calls if any(s != short_slot for s, _n, _p in rows)]
    prefill = long_rounds[:60 // 8 + 1]
    # the prompt went in chunks of at most 8, each beside a step of the decoding job
    assert sum(n for rows in prefill for s, n, _p in rows if s != short_slot) == 60
    assert all(sum(n for s, n, _p in rows if s != short_slot) <= 8 for rows in prefill)
    assert all(any(s == short_slot and n == 1 for s, n, _p in rows) for rows in prefill)
    assert "short" not in results or results["short"][1] == "length"


def test_a_short_prompt_runs_before_a_long_one_that_came_first(native_model, monkeypatch):
    monkeypatch.setattr(worker, "PREFILL_CHUNK", 8)
    calls = _recording(native_model, monkeypatch)
    gen = Generator("m", native_model, max_queue=8, slots=8, metrics=Metrics())
    results: dict = {}
    done = threading.Event()
    with gen._cv:  # both queued before the worker's next round: the long one first
        _submit(gen, _prompts(1, 60, seed=5)[0], 2, results, "long", done, 2)
        _submit(gen, _prompts(1, 3, seed=6)[0], 2, results, "short", done, 2)
    assert done.wait(60)
    (short_slot, short_n, _), (long_slot, long_n, _) = calls[0]
    assert (short_n, long_n) == (3, 5) and short_slot != long_slot  # the short prompt whole, the long one the rest
    assert all(results[k][0] == "done" for k in ("long", "short"))


def test_a_shared_prefix_is_reused_from_the_cache(native_model, monkeypatch):
    base = _prompts(1, 30, seed=4)[0]
    first, second = base + [5, 6, 7], base + [8, 9]
    fresh = _run(Generator("m", native_model, max_queue=8, slots=2, metrics=Metrics()), [second], 10)[0]
    calls = _recording(native_model, monkeypatch)
    gen = Generator("m", native_model, max_queue=8, slots=2, metrics=Metrics())
    _run(gen, [first], 10)
    calls.clear()
    (end, tokens) = _run(gen, [second], 10)[0]
    assert tokens == fresh[1]
    usage = end[2]
    assert usage["cached_tokens"] == len(base) and fresh[0][2]["cached_tokens"] == 0
    assert calls[0] == [(calls[0][0][0], 2, len(base))]  # only the new tokens ran
    assert f"rbe_prompt_tokens_cached_total {len(base)}" in gen.metrics.render()


def test_concurrent_prompts_compute_a_shared_prefix_once(native_model, monkeypatch):
    """Requests arriving together with one 30-token prefix (a system prompt): one of them computes
    it, the others wait a round, copy it into their slots and run only their own tokens; each
    output equals the request's alone."""
    base = _prompts(1, 30, seed=8)[0]
    prompts = [base + tail for tail in ([5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16])]
    alone = [_run(Generator("m", native_model, max_queue=8, slots=8, metrics=Metrics()), [p], 6)[0][1]
             for p in prompts]
    calls = _recording(native_model, monkeypatch)
    gen = Generator("m", native_model, max_queue=8, slots=8, metrics=Metrics())
    results: dict = {}
    done = threading.Event()
    with gen._cv:  # all queued before the worker's next round
        jobs = [_submit(gen, p, 6, results, k, done, len(prompts)) for k, p in enumerate(prompts)]
    assert done.wait(60)
    assert [job.tokens for job in jobs] == alone
    assert calls[0] == [(calls[0][0][0], 33, 0)]  # the first round: one prompt whole, the others wait
    assert sorted(n for _s, n, p in calls[1] if p == 30) == [3, 3, 3]  # then only their own tokens
    assert sorted(results[k][2]["cached_tokens"] for k in range(4)) == [0, 30, 30, 30]
    assert "rbe_prompt_tokens_cached_total 90" in gen.metrics.render()
