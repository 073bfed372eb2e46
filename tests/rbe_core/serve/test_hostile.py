"""Hostile input: hundreds of malformed requests (bad JSON, invalid UTF-8, wrong types, huge or
negative numbers, enormous prompts, missing fields, bad roles, unknown models) and the known
edge cases (deep nesting, a 5000-digit seed, lone surrogates, model paths escaping the models
directory) each get a 4xx JSON error in the OpenAI shape, the server keeps serving, and
``/metrics`` counts no 5xx."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from _serve_helpers import KEY, Server  # noqa: E402

pytest.importorskip("fastapi", reason="rbe serve needs the serve extra (pip install 'rbe[serve]')")

MAX_BODY = 1 << 18  # over the 100000-byte nesting case: it must reach the JSON parser
VALID = {
    "/v1/completions": {"model": "tiny", "prompt": "the of", "max_tokens": 2},
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/embeddings": {"model": "tiny", "input": "x"},  # tiny is not an encoder: always a 400
    "/v1/models/load": {"path": "/nonexistent/file.rbe"},
    "/v1/models/unload": {"model": "no-such-model"},
}
WRONG_TYPES = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=5),
                        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                             max_size=2))
BAD_VALUES = {
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=10**7), st.just(1e30), st.just("5")),
    "temperature": st.one_of(st.floats(max_value=-0.01), st.floats(min_value=2.01), st.just("hot")),
    "top_p": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.01)),
    "n": st.one_of(st.integers(max_value=0), st.integers(min_value=17)),
    "stop": st.one_of(st.lists(st.text(min_size=1), min_size=5, max_size=8), st.just([""]), st.just(5)),
    "seed": st.one_of(st.integers(min_value=2**63), st.just("x")),
    "model": st.one_of(st.text(max_size=20).filter(lambda s: s != "tiny"), st.integers()),
    "prompt": st.one_of(st.just(""), st.just([]), st.just([-1]), st.just([10**9]), st.just(["a"] * 65),
                        st.just("the " * 8000)),
    "messages": st.one_of(st.just([]), st.just([{"role": "wizard", "content": "x"}]),
                          st.just([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
                          st.just([{"content": "no role"}]), st.just("hello")),
}


@st.composite
def hostile(draw):
    """(path, raw body bytes): one valid-looking request with one thing wrong."""
    path = draw(st.sampled_from(sorted(VALID)))
    body = dict(VALID[path])
    kind = draw(st.sampled_from(["bytes", "utf8", "not-object", "missing", "type", "value", "huge"]))
    if kind == "bytes":
        raw = draw(st.binary(max_size=200))
        try:
            json.loads(raw)
            raw = b"{" + raw
        except (ValueError, UnicodeDecodeError):
            pass
        return path, raw
    if kind == "utf8":
        return path, b'{"model": "tiny", "prompt": "\xff\xfe\xc3\x28"}'
    if kind == "not-object":
        return path, json.dumps(draw(st.one_of(st.lists(st.integers()), st.integers(), st.text()))).encode()
    if kind == "missing":
        del body[draw(st.sampled_from(sorted(k for k in body if k != "max_tokens")))]
    elif kind == "type":
        field = draw(st.sampled_from(sorted(body)))
        body[field] = draw(WRONG_TYPES.filter(lambda v, f=field: not isinstance(v, type(VALID[path][f]))
                                              and not (f == "max_tokens" and v is None)))
    elif kind == "value":
        if path.startswith("/v1/models/") or path == "/v1/embeddings":
            body["model" if "model" in body else "path"] = draw(st.sampled_from(["", "x" * 300, "../../etc/passwd"]))
        else:
            field = draw(st.sampled_from(sorted(k for k in BAD_VALUES if k in body or k not in ("prompt", "messages"))
                                         ).filter(lambda f, p=path: not (f == "prompt" and "chat" in p)
                                                  and not (f == "messages" and "chat" not in p)))
            body[field] = draw(BAD_VALUES[field])
    else:
        return path, b'{"model": "tiny", "prompt": "' + b"a" * (MAX_BODY + 10) + b'"}'
    return path, json.dumps(body).encode()


@pytest.fixture(scope="module")
def server(models):
    d, llama, _ = models
    srv = Server(str(llama), "--api-key", KEY, "--max-body", str(MAX_BODY), "--models-dir", str(d))
    yield srv
    assert srv.stop() == 0


def _assert_error(status: int, data: bytes, request) -> dict:
    assert 400 <= status < 500, (request, status, data[:300])
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _server_errors(server) -> list[str]:
    """The ``rbe_requests_total`` lines of ``/metrics`` with a 5xx status (but ``/health``'s 503s
    while the model loaded: the readiness answer ``Server`` waited through)."""
    text = server.request("GET", "/metrics", key=None)[2].decode()
    return [ln for ln in text.splitlines() if re.match(r'rbe_requests_total\{.*status="5\d\d"', ln)
            and not ln.startswith('rbe_requests_total{endpoint="/health",status="503"}')]


def test_every_malformed_request_gets_a_4xx_json_error(server):
    seen = []

    @settings(max_examples=500, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(hostile())
    def check(req):
        path, raw = req
        status, headers, data = server.request("POST", path, raw=raw)
        _assert_error(status, data, (path, raw[:200]))
        seen.append(status)

    check()
    assert len(seen) >= 500
    assert server.request("GET", "/health")[0] == 200
    # greedy: sampled at the default temperature, the tiny model may end at its first token
    out = server.json("POST", "/v1/completions", {**VALID["/v1/completions"], "temperature": 0})
    assert out[0] == 200 and out[1]["usage"]["completion_tokens"] == 2
    assert _server_errors(server) == []


EDGE_CASES = {
    "deep nesting": ("/v1/completions", b"[" * 100_000),
    "5000-digit seed": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "seed": ' + b"7" * 5000 + b"}"),
    "surrogate in a prompt": ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}'),
    "surrogate in chat content": ("/v1/chat/completions",
                                  b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    "surrogate in a model name": ("/v1/completions", b'{"model": "ti\\ud800ny", "prompt": "x"}'),
}


def test_edge_cases_are_400_and_leave_no_5xx(server):
    for what, (path, raw) in EDGE_CASES.items():
        status, _, data = server.request("POST", path, raw=raw)
        assert status == 400, (what, status, data[:300])
        _assert_error(status, data, what)
    assert server.json("POST", "/v1/completions", VALID["/v1/completions"])[0] == 200
    assert _server_errors(server) == []


def test_model_paths_out_of_the_models_dir_are_one_404(server, models, tmp_path_factory):
    """A real model outside ``--models-dir``, reached by its absolute path, through ``..`` and
    through a symlink inside the directory, is refused with the message a missing file gets."""
    d, llama, _ = models
    outside = tmp_path_factory.mktemp("outside") / "outside.rbe"
    shutil.copy(llama, outside)
    (d / "link.rbe").symlink_to(outside)
    dotdot = f"../{outside.parent.name}/{outside.name}"
    assert (d / dotdot).is_file()
    for path in (str(outside), dotdot, "link.rbe", "missing.rbe"):
        status, _, data = server.request("POST", "/v1/models/load", {"path": path, "name": "escaped"})
        err = _assert_error(status, data, path)
        assert status == 404 and err["code"] == "model_not_found", (path, err)
        assert err["message"] == f"no model file {path!r} in the models directory"
    assert "escaped" not in [m["id"] for m in server.json("GET", "/v1/models")[1]["data"]]
    assert server.request("GET", "/health")[0] == 200
    assert _server_errors(server) == []
