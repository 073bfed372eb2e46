"""``rbe serve --ray --replicas 2``: two replicas behind Ray Serve's proxy answer the ``openai``
client (a Ray instance of the server's own; run by the ``ray`` nox session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
from _model_helpers import tiny_llama, write_gguf  # noqa: E402

import rbe_core  # noqa: E402

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'rbe[ray]')")
pytestmark = pytest.mark.ray


def test_serve_replicas_answer_the_openai_client(tmp_path):
    from _serve_helpers import Server

    write_gguf(tiny_llama(tie_word_embeddings=True), tmp_path / "tiny.gguf")
    model = rbe_core.compress_model(tmp_path / "tiny.gguf", tmp_path / "tiny.rbe", codec="int8", progress=False,
                                    calibration=False)
    srv = Server(str(model), "--ray", "--replicas", "2", "--slots", "2")
    try:
        client = srv.client()
        health = srv.json("GET", "/health", key=None)[1]
        assert [m.id for m in client.models.list().data] == ["tiny"], health
        replicas = set()
        for i in range(8):
            out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"hi {i}"}],
                                                 max_tokens=3, temperature=0)  # greedy: no random EOS
            assert out.usage.completion_tokens == 3
            replicas.add(srv.json("GET", "/health", key=None)[1]["replica"])
        pieces = list(client.completions.create(model="tiny", prompt="the", max_tokens=4, stream=True, temperature=0))
        assert pieces[-1].choices[0].finish_reason == "length"
        for _ in range(64):  # idle replicas are picked at random: 8 requests all hit one 1 time in 128
            if len(replicas) == 2:
                break
            replicas.add(srv.json("GET", "/health", key=None)[1]["replica"])
        assert len(replicas) == 2
    finally:
        assert srv.stop() == 0
