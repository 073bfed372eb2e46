"""The models the server tests serve: a tiny Llama with a chat template, and MiniLM when installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from _model_helpers import tiny_llama, write_gguf  # noqa: E402
from _serve_helpers import CHATML, MINILM  # noqa: E402

import rbe_core  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    write_gguf(tiny_llama(tie_word_embeddings=True, max_position_embeddings=128), d / "tiny.gguf", chat_template=CHATML)
    llama = rbe_core.compress_model(d / "tiny.gguf", d / "tiny.rbe", codec="int8", progress=False, calibration=False)
    minilm = None
    if MINILM is not None:
        minilm = rbe_core.compress_model(MINILM / "model", d / "minilm.rbe", codec="int8", progress=False,
                                         calibration=False)
    return d, llama, minilm
