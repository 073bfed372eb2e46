"""Safe defaults of ``rbe serve``: model loading over HTTP confined to ``--models-dir`` (and off
without it), slow clients cut off by the header and body timeouts, every answer (a 500 from a
bug included) counted in ``/metrics`` and shaped as an OpenAI error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from _model_helpers import free_port  # noqa: E402
from _serve_helpers import Server  # noqa: E402

pytest.importorskip("fastapi", reason="rbe serve needs the serve extra (pip install 'rbe[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from rbe_core.serve.app import Settings, create_app, head_deadline_protocol  # noqa: E402

PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def _unload_head(length: int) -> bytes:
    return (b"POST /v1/models/unload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % length)


PARTIAL_BODY = _unload_head(100) + b'{"model": '


@contextlib.contextmanager
def _client(**settings):
    with TestClient(create_app(Settings(**settings))) as client:
        yield client


def _error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- loading models over HTTP ---------------------------------------------------------------


def test_loading_over_http_is_off_without_models_dir(models):
    _, llama, _ = models
    with _client() as client:
        err = _error(client.post("/v1/models/load", json={"path": str(llama)}), 403, "model_loading_disabled")
        assert "--models-dir" in err["message"]
        assert client.get("/v1/models").json()["data"] == []


@pytest.fixture
def models_dir(models, tmp_path):
    """A models directory holding tiny.rbe, a subdirectory, a symlink to tiny.rbe, one out of the
    directory (to a real model), a symlink loop, a file that is no model and an unreadable one;
    the outside model."""
    _, llama, _ = models
    inside, outside = tmp_path / "models", tmp_path / "elsewhere"
    (inside / "sub").mkdir(parents=True)
    outside.mkdir()
    shutil.copy(llama, inside / "tiny.rbe")
    shutil.copy(llama, outside / "outside.rbe")
    (inside / "alias.rbe").symlink_to(inside / "tiny.rbe")
    (inside / "sub" / "escape.rbe").symlink_to(outside / "outside.rbe")
    (inside / "loop.rbe").symlink_to(inside / "loop.rbe")
    (inside / "garbage.rbe").write_bytes(b"secret-token-123 " * 64)
    (inside / "locked.rbe").write_bytes(llama.read_bytes())
    (inside / "locked.rbe").chmod(0)
    return inside, outside / "outside.rbe"


def test_models_dir_loads_inside_only(models_dir):
    inside, outside = models_dir
    refused = [str(outside), "../elsewhere/outside.rbe", "sub/escape.rbe", "missing.rbe", "sub", "", "a\x00b", "loop.rbe",
               "x" * 5000, str(inside / "sub" / ".." / ".." / "elsewhere" / "outside.rbe")]
    if os.geteuid() != 0:  # root reads any file
        refused.append("locked.rbe")
    with _client(models_dir=str(inside)) as client:
        for path in refused:
            err = _error(client.post("/v1/models/load", json={"path": path, "name": "x"}), 404, "model_not_found")
            assert err["message"] == f"no model file {path!r} in the models directory", path
        for name, path in (("relative", "tiny.rbe"), ("absolute", str(inside / "tiny.rbe")),
                           ("dotdot", "sub/../tiny.rbe"), ("alias", "alias.rbe")):
            answer = client.post("/v1/models/load", json={"path": path, "name": name})
            assert answer.status_code == 200, (path, answer.text)
            assert answer.json()["path"] == str((inside / "tiny.rbe").resolve())
        assert sorted(m["id"] for m in client.get("/v1/models").json()["data"]) == ["absolute", "alias", "dotdot",
                                                                                    "relative"]


def test_a_file_that_is_no_model_is_refused_without_its_bytes(models_dir):
    inside, _ = models_dir
    with _client(models_dir=str(inside)) as client:
        err = _error(client.post("/v1/models/load", json={"path": "garbage.rbe"}), 400, "invalid_model")
    assert "garbage.rbe" in err["message"] and "not a valid" in err["message"]
    assert "secret" not in err["message"] and not re.search(r"\d", err["message"]), err["message"]


# ---- every answer counted ---------------------------------------------------------------------


def test_a_bug_is_a_counted_500_in_the_openai_shape(monkeypatch):
    with _client() as client:
        def broken():
            raise RuntimeError("private detail")

        monkeypatch.setattr(client.app.state.store, "names", broken)
        err = _error(client.get("/v1/models"), 500)
        assert err["type"] == "server_error" and "RuntimeError" in err["message"]
        assert "private detail" not in err["message"]
        monkeypatch.undo()
        metrics = client.get("/metrics").text
    assert 'rbe_requests_total{endpoint="/v1/models",status="500"} 1' in metrics


# ---- slow clients -----------------------------------------------------------------------------


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What ``sock`` received before the server closed it, or None if still open after ``seconds``."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


async def _tiny_app(scope, receive, send):
    """``/slow`` answers after 1.5 s, anything else at once, both keeping the connection open."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(1.5)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def _uvicorn(protocol):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_tiny_app, host="127.0.0.1", port=port, http=protocol, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started and time.monotonic() < end:
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def _protocol_bases():
    from uvicorn.protocols.http.h11_impl import H11Protocol

    bases = [pytest.param(H11Protocol, id="h11")]
    with contextlib.suppress(ImportError):
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        bases.append(pytest.param(HttpToolsProtocol, id="httptools"))
    return bases


@pytest.mark.parametrize("base", _protocol_bases())
def test_head_deadline_closes_stalled_heads_and_spares_requests_in_flight(base):
    with _uvicorn(head_deadline_protocol(0.5, base)) as port:
        start = time.monotonic()
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(PARTIAL_HEAD)
        assert _closed_within(stalled, 5) == b"" and time.monotonic() - start >= 0.45
        # a request in flight past the deadline is answered; the next head then has a deadline of its own
        kept = socket.create_connection(("127.0.0.1", port))
        kept.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        kept.settimeout(10)
        answer = b""
        while not answer.endswith(b"ok") and (chunk := kept.recv(65536)):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
        start = time.monotonic()
        kept.sendall(PARTIAL_HEAD)  # uvicorn's keep-alive timeout stops at its first byte
        assert _closed_within(kept, 5) == b"" and 0.45 <= time.monotonic() - start < 4
        for sock in (stalled, kept):
            sock.close()


@pytest.fixture(scope="module")
def strict_server():
    srv = Server("--header-timeout", "1", "--body-timeout", "1")
    yield srv
    assert srv.stop() == 0


def test_half_open_connections_are_closed_and_others_answered(strict_server):
    start = time.monotonic()
    held = [socket.create_connection(("127.0.0.1", strict_server.port)) for _ in range(100)]
    for sock in held:
        sock.sendall(PARTIAL_HEAD)
    assert strict_server.request("GET", "/health")[0] == 200
    assert all(_closed_within(sock, 0.01) is None for sock in held[:10])  # still held while it was answered
    assert all(_closed_within(sock, 10) == b"" for sock in held)
    assert 0.9 <= time.monotonic() - start < 10
    for sock in held:
        sock.close()


def test_a_stalled_body_is_answered_408_and_closed(strict_server):
    sock = socket.create_connection(("127.0.0.1", strict_server.port))
    start = time.monotonic()
    sock.sendall(PARTIAL_BODY)
    answer = _closed_within(sock, 10)
    sock.close()
    assert answer is not None and time.monotonic() - start >= 0.9
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_a_slow_body_within_the_timeout_is_served(strict_server):
    body = b'{"model": "nothing-loaded"}'
    sock = socket.create_connection(("127.0.0.1", strict_server.port))
    sock.sendall(_unload_head(len(body)) + body[:5])
    time.sleep(0.4)
    sock.sendall(body[5:])
    answer = _closed_within(sock, 10)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 404") and b"model_not_found" in answer  # parsed: the model is unknown


def test_a_client_hanging_up_mid_body_is_a_499(strict_server):
    sock = socket.create_connection(("127.0.0.1", strict_server.port))
    sock.sendall(PARTIAL_BODY)
    time.sleep(0.2)
    sock.close()
    line = 'rbe_requests_total{endpoint="/v1/models/unload",status="499"}'
    end = time.monotonic() + 10
    while line not in (text := strict_server.request("GET", "/metrics")[2].decode()) and time.monotonic() < end:
        time.sleep(0.05)
    assert line in text
    assert not re.search(r'rbe_requests_total\{.*status="5\d\d"', text)
