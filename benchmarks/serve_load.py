"""Load on ``rbe serve``: N concurrent streaming chat clients against a real model.

For each concurrency level, N client threads each send ``--requests`` streaming chat requests one
after another (``max_tokens`` fixed, ``ignore`` of EOS is not available, so replies may end early:
tokens are counted from ``usage``), while a probe thread asks ``/health`` every 0.2 s. Reported:
requests/s, time to first token p50/p99 (first content delta), aggregate generated tokens/s,
errors, and ``/health`` latency during the load. A second server with ``--max-queue 1 --slots 1``
measures how fast a full queue answers 503.

    python benchmarks/serve_load.py                     # SmolLM2 flagship; writes docs/serving.md
    python benchmarks/serve_load.py --model smol.rbe --out -
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import decode as d  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- benchmarks/serve_load.py: begin -->", "<!-- benchmarks/serve_load.py: end -->"
PROMPTS = ["Write a short poem about the sea.", "Explain what a compiler does.", "List three uses of copper.",
           "What is the capital of France?", "Describe a cat to someone who has never seen one."]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, backend: str, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rbe_core.cli", "serve", str(model), "--port", str(port),
                             "--backend", backend, *extra], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"rbe serve exited: {proc.stderr.read()}")
        try:
            if get(port, "/health")[0] == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit("rbe serve did not become ready")


def get(port: int, path: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    r = conn.getresponse()
    r.read()
    conn.close()
    return r.status, time.perf_counter() - t0


def chat(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    """One streaming chat request: status, seconds to the first content delta, tokens, seconds."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "stream": True, "temperature": 0.7, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = {"status": r.status, "ttft": None, "tokens": 0}
    if r.status != 200:
        r.read()
    else:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
            if out["ttft"] is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                out["ttft"] = time.perf_counter() - t0
    conn.close()
    out["seconds"] = time.perf_counter() - t0
    return out


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")


def level(port: int, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    health: list[float] = []
    stop = threading.Event()

    def client(i: int):
        for k in range(requests):
            results.append(chat(port, model, PROMPTS[(i + k) % len(PROMPTS)], max_tokens))

    def probe():
        while not stop.is_set():
            status, dt = get(port, "/health")
            health.append(dt if status == 200 else float("inf"))
            stop.wait(0.2)

    p = threading.Thread(target=probe)
    p.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    p.join()
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok), "wall_s": wall,
            "requests_per_s": len(results) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "health_p50_ms": 1000 * pct(health, 0.5),
            "health_max_ms": 1000 * max(health, default=float("nan"))}


def queue_full(model: Path, backend: str, name: str) -> dict:
    proc, port = start(model, backend, "--max-queue", "1", "--slots", "1")
    try:
        statuses, times = [], []
        long = threading.Thread(target=chat, args=(port, name, PROMPTS[0], 200))
        long.start()
        time.sleep(1.0)
        burst = [threading.Thread(target=lambda: statuses.append(_timed(port, name, times))) for _ in range(10)]
        for t in burst:
            t.start()
        for t in burst:
            t.join()
        long.join()
        rejected = [dt for s, dt in zip(statuses, times, strict=False) if s == 503]
        return {"burst": len(statuses), "rejected": len(rejected),
                "reject_ms_max": 1000 * max(rejected, default=float("nan"))}
    finally:
        proc.terminate()
        proc.wait(60)


def _timed(port: int, name: str, times: list) -> int:
    t0 = time.perf_counter()
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    conn.close()
    times.append(time.perf_counter() - t0)
    return r.status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: SmolLM2 flagship 4.25 bpw (converted if missing)")
    p.add_argument("--backend", default="cffi")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=3, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rbe-bench")
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "serving.md"))
    args = p.parse_args(argv)
    model = args.model or d.ensure_rbe_files(args.cache, d.smollm2_gguf())["flagship"]
    name = model.stem
    proc, port = start(model, args.backend, "--slots", str(max(args.concurrency)), "--max-queue", "256")
    try:
        chat(port, name, "warm up", 4)
        rows = [level(port, name, c, args.requests, args.max_tokens) for c in args.concurrency]
    finally:
        proc.terminate()
        proc.wait(60)
    full = queue_full(model, args.backend, name)
    cpu = d.cpu_name()
    lines = [MARK_BEGIN, "## Load (`benchmarks/serve_load.py`)", "",
             f"`python benchmarks/serve_load.py` — `{name}` on `{args.backend}`, {cpu}, {os.cpu_count()} cores; "
             f"streaming chat, max_tokens {args.max_tokens}, {args.requests} requests per client, "
             f"`--slots {max(args.concurrency)}`.", "",
             "| clients | requests | errors | requests/s | tokens/s (all) | TTFT p50 s | TTFT p99 s | /health p50 ms | /health max ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | "
                     f"{r['health_p50_ms']:.1f} | {r['health_max_ms']:.1f} |")
    lines += ["", f"Full queue (`--max-queue 1 --slots 1`, one long request running, a burst of {full['burst']}): "
              f"{full['rejected']} answered 503, the slowest in {full['reject_ms_max']:.1f} ms.", MARK_END]
    text = "\n".join(lines) + "\n"
    d.publish(text, args.out, MARK_BEGIN, MARK_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
