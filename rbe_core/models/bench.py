"""``rbe bench``: prefill and decode throughput and peak memory, compressed vs dense fp32.

Each variant runs in its own fresh process (spawn) so its peak resident memory (``VmHWM``, which
a new program image starts afresh, unlike ``ru_maxrss``) is its own; ``base_rss_mb`` is that
process's peak after imports, before loading the model.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import sys
import time
from typing import Any

import numpy as np

from ..registry import get_backend
from .generation import TextGeneration
from .loading import load_inference, load_model
from .numpy_bert import NumpyBert


def _rss_mb() -> float:
    """Peak resident memory of this process image in MB (``ru_maxrss`` where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _run(path: str, backend: str | None, dense: bool, prompt_tokens: int, new_tokens: int,
         threads: int | None, engine: str = "auto") -> dict[str, Any]:
    """One variant in this (fresh) process: the .rbe model as ``rbe infer`` runs it
    (``load_inference``: no torch on a native engine or for an encoder), or its dense fp32 twin."""
    if threads:
        os.environ["RBE_CFFI_THREADS"] = str(threads)  # the cffi backend's own pool: same core count
    base = _rss_mb()
    t0 = time.perf_counter()
    model = load_model(path, dense=True) if dense else load_inference(path, backend, engine=engine)
    load_s = time.perf_counter() - t0
    if threads and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    causal = isinstance(model, TextGeneration)
    limit = model.config["max_position"] - (new_tokens + 1 if causal else 0)
    n = max(1, min(prompt_tokens, limit))
    ids = np.random.default_rng(0).integers(0, model.config["vocab_size"], n)
    out: dict[str, Any] = {"variant": "dense-fp32" if dense else "rbe", "backend": "torch" if dense else get_backend(backend).name,
                           "engine": getattr(model, "engine_name", "torch"), "load_s": load_s, "prompt_tokens": n,
                           "threads": threads or _default_threads()}
    t0 = time.perf_counter()
    if not causal:
        _encode(model, ids)
        out["prefill_tok_s"] = n / (time.perf_counter() - t0)
    else:
        logits, state = model.start(ids.tolist())
        out["prefill_tok_s"] = n / (time.perf_counter() - t0)
        native = getattr(model, "native", None)
        if native is not None:
            native.profile()  # reset: the split below is of the decode steps only
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            logits, state = model.step(int(logits.argmax()), state)
        out["decode_tok_s"] = new_tokens / (time.perf_counter() - t0)
        out["new_tokens"] = new_tokens
        if native is not None:
            out["decode_ms_per_token"] = {k: 1000.0 * v / new_tokens for k, v in native.profile().items()}
    out.update(base_rss_mb=base, peak_rss_mb=_rss_mb(), load_avg=os.getloadavg()[0])
    return out


def _encode(model, ids: np.ndarray) -> None:
    """One pass of an encoder over ``ids`` (numpy, or the torch modules)."""
    if isinstance(model, NumpyBert):
        model.hidden_states(ids[None], np.ones((1, ids.size), dtype=bool), np.zeros((1, ids.size), dtype=np.int64))
        return
    import torch

    with torch.no_grad():
        model(torch.from_numpy(ids)[None])


def _default_threads() -> int:
    """torch's intra-op threads when torch is loaded, else the cffi pool's own choice (the cores)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else os.cpu_count() or 1


#: Set for both variants' processes unless already set: OpenMP workers that spin after each
#: parallel region fight the other jobs and the cffi pool for shared cores (measured on a loaded
#: 2-core machine: dense fp32 decode 460 -> 71 ms/token with it). It only helps the baseline.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def bench(path: str, backend: str | None = None, prompt_tokens: int = 64, new_tokens: int = 32,
          threads: int | None = None, engine: str = "auto") -> list[dict[str, Any]]:
    """Measure the .rbe model at ``path`` and its dense fp32 twin, one fresh process each
    (``threads`` sets torch's intra-op threads and the cffi backend's threads; default: their own
    choice; ``engine`` as in ``load_model``: a causal LM's steps run in the backend's native engine
    when it has one, and each row says which ran, with the engine's per-token time split). ``load_avg`` in each row is the 1-minute load average when that variant finished:
    above the core count, other jobs shared the cores and both figures are pessimistic."""
    ctx = multiprocessing.get_context("spawn")
    rows = []
    added = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
    os.environ.update(added)  # inherited by the spawned workers, read when they load torch
    try:
        for dense in (False, True):
            with ctx.Pool(1) as pool:
                rows.append(pool.apply(_run, (str(path), backend, dense, prompt_tokens, new_tokens, threads, engine)))
    finally:
        for k in added:
            os.environ.pop(k, None)
    return rows
