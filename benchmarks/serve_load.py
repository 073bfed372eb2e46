"""Load on ``rbe serve`` side by side with llama.cpp's ``llama-server``: same model, same bits, same requests.

Both servers run at once (rbe on an ``.rbe`` file, llama-server on a GGUF of the same weights and
bits: by default SmolLM2-135M-Instruct as rbe ``int4`` against llama.cpp ``Q4_0``, both 4-bit codes
with 16-bit scales, 4.5 bits/weight), with the same threads, and are measured in turn: at each level
``--repeat`` passes per server in A B B A order, the pass with the most tokens/s kept (these
machines are shared: another process's burst stalls a server's threads). In a pass of N concurrent
streams, N client threads send ``--requests`` streaming chat requests in all (each client takes the
level's next request when its last reply is done: replies that end early at EOS leave no stream
idle while others still have a fixed share to send) with the same
``max_tokens`` and temperature 0: short questions, and ``--long-requests`` (default one) prompts of
about ``--long-prompt-tokens`` tokens of real text mixed in a quarter of the way through (a
different slice each time, so no prefix cache can answer it). Replies may end at EOS before
``max_tokens``: generated tokens are counted from each stream's ``usage`` (``include_usage``).

Per server and level: generated tokens/s over the level's wall time (all streams together) and
while every stream is busy (until the first one finds no request left: the rate N concurrent
streams sustain, without the drain at the level's end, when replies of different lengths leave
fewer streams running), time
to first token p50/p95 over all requests (first non-empty content delta, or the finish reason when
the first token is EOS) and the long prompt's own, inter-token latency p50/p95/max (gaps between
content deltas of a stream, all streams pooled), errors, early EOS, ``/health`` latency under the
load (probed every 0.2 s), sequences per forward pass while all streams are busy (each server's
``/metrics``); then the ratios rbe / llama-server and the targets. Last, rbe alone with
``--max-queue 1 --slots 1``: how fast a full queue answers 503.

    python benchmarks/serve_load.py                           # builds llama-server if needed; writes docs/serving.md
    python benchmarks/serve_load.py --llama-server PATH --levels 1,8 --requests 16 --out -

llama-server comes from ``benchmarks/scale.py``'s ``ensure_llama_tools`` (built from the source
vendored in the llama-cpp-python sdist, into ``--cache``) unless ``--llama-server`` names one; the
GGUF from ``benchmarks/decode.py``'s ``ensure_ggufs`` (needs llama-cpp-python, built there).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import decode as d  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- benchmarks/serve_load.py: begin -->", "<!-- benchmarks/serve_load.py: end -->"
PROMPTS = ["Write a short poem about the sea.", "Explain what a compiler does.", "List three uses of copper.",
           "What is the capital of France?", "Describe a cat to someone who has never seen one."]
RBE, LLAMA = "rbe serve", "llama-server"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free loopback port, its output in a temporary file (a pipe could fill)."""

    def __init__(self, label: str, command: list[str], port: int, env: dict | None = None):
        self.label, self.port, self.command = label, port, command
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env)
        end = time.monotonic() + 600
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                sys.exit(f"{label} exited ({self.proc.returncode}): {self.tail()}")
            try:
                if get(port, "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        sys.exit(f"{label} did not become ready: {self.tail()}")

    def tail(self, n: int = 4000) -> str:
        self.log.seek(0)
        return self.log.read()[-n:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def start_rbe(model: Path, backend: str, threads: int, *extra: str) -> Server:
    port = free_port()
    return Server(RBE, [sys.executable, "-m", "rbe_core.cli", "serve", str(model), "--port", str(port),
                        "--backend", backend, *extra], port,
                  env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE", RBE_CFFI_THREADS=str(threads)))


def start_llama(binary: Path, gguf: Path, name: str, threads: int, slots: int, ctx_per_slot: int) -> Server:
    """llama-server with ``slots`` parallel sequences, each ``ctx_per_slot`` tokens of context (``-c`` is
    the total, split across the slots); continuous batching and prompt caching are its defaults."""
    port = free_port()
    return Server(LLAMA, [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                          "--alias", name, "-t", str(threads), "-tb", str(threads), "--parallel", str(slots),
                          "-c", str(slots * ctx_per_slot), "--metrics"], port)


def get(port: int, path: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    r = conn.getresponse()
    r.read()
    conn.close()
    return r.status, time.perf_counter() - t0


def rounds(server: Server) -> tuple[float, float]:
    """(forward passes, sequences summed over them) the server has run so far, from its /metrics:
    rbe's engine-round histogram, llama-server's decode counter and busy slots per decode."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    if server.label == RBE:
        return float(values["rbe_engine_round_sequences_count"]), float(values["rbe_engine_round_sequences_sum"])
    n = float(values["llamacpp:n_decode_total"])
    return n, n * float(values["llamacpp:n_busy_slots_per_decode"])


def chat(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    """One streaming chat request at temperature 0: status, seconds to the first content delta (or to the
    finish reason, when the first token is EOS), the gaps between content deltas and their clock times
    (``time.perf_counter``), generated and prompt tokens (from ``usage``), finish reason, seconds."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "stream": True, "temperature": 0.0, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    out = {"status": 0, "ttft": None, "tokens": 0, "prompt_tokens": 0, "gaps": [], "times": [], "finish": None}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        out["status"] = r.status
        if r.status != 200:
            r.read()
        else:
            last = None
            for line in r:
                now = time.perf_counter()
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
                    out["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
                for c in chunk.get("choices") or []:
                    out["finish"] = c.get("finish_reason") or out["finish"]
                    if c.get("finish_reason") and out["ttft"] is None:  # EOS first: no content at all
                        out["ttft"] = now - t0
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                    out["times"].append(now)
                    if last is None:
                        out["ttft"] = now - t0 if out["ttft"] is None else out["ttft"]
                    else:
                        out["gaps"].append(now - last)
                    last = now
        conn.close()
    except (OSError, http.client.HTTPException, ValueError) as e:
        out["status"], out["error"] = -1, repr(e)
    out["seconds"] = time.perf_counter() - t0
    return out


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")


def long_prompts(model: Path, tokens: int, count: int) -> list[str]:
    """``count`` prompts of about ``tokens`` tokens: slices of real text starting at different places,
    then the question (so no two share a prefix beyond the chat template)."""
    from rbe_core.files import open as open_rbe
    from rbe_core.models.spec import load_tokenizer

    with open_rbe(model) as f:
        tok = load_tokenizer(json.dumps(f.metadata["rbe.tokenizer"]))
    ids = d.prompt_ids(model, tokens + 997 * count)
    return [tok.decode(ids[997 * i: 997 * i + tokens]) + "\n\nSummarize the text above in one sentence."
            for i in range(count)]


def schedule(total: int, longs: list[str]) -> list[str]:
    """The level's prompts in the order they are taken: the long prompts at the places (4k + 1) ·
    total / (4 · len(longs)), k = 0, 1, ... (one long prompt: a quarter of the way in, when every
    stream is busy), short questions elsewhere."""
    at = {(4 * k + 1) * total // (4 * len(longs)): p for k, p in enumerate(longs)}
    return [at.get(j, PROMPTS[j % len(PROMPTS)]) for j in range(total)]


def tokens_before(results: list[dict], moment: float) -> float:
    """Generated tokens streamed before ``moment``: each reply's ``usage`` tokens times the share of its
    content deltas that arrived by then (a delta may carry more than one token)."""
    return sum(r["tokens"] * sum(t <= moment for t in r["times"]) / len(r["times"]) for r in results if r["times"])


def jiffies(pids: list[int]) -> tuple[int, int]:
    """Busy CPU ticks of the whole machine, and of ``pids`` (user + system), from /proc (0, 0 elsewhere)."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
        mine = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            mine += int(fields[11]) + int(fields[12])
        return sum(f) - f[3] - f[4], mine
    except (OSError, ValueError, IndexError):
        return 0, 0


def level(server: Server, model: str, streams: int, plan: list[str], max_tokens: int, long_set: set[str],
          ours: list[int]) -> dict:
    """One pass: ``streams`` clients, each taking the next prompt of ``plan`` when its last reply is
    done; ``ours``: the benchmark's own processes (the rest of the machine's CPU is other jobs')."""
    results: list[dict] = []
    health: list[float] = []
    stop = threading.Event()
    queue = collections.deque(plan)
    idle: list[float] = []  # when each client found the plan empty
    at_idle: list[tuple[float, float]] = []  # the server's rounds() then, by the first one
    lock = threading.Lock()

    def client():
        while True:
            try:
                prompt = queue.popleft()
            except IndexError:
                with lock:
                    idle.append(time.perf_counter())
                    if len(idle) == 1:
                        at_idle.append(rounds(server))
                return
            r = chat(server.port, model, prompt, max_tokens)
            r["long"] = prompt in long_set
            results.append(r)

    def probe():
        while not stop.is_set():
            try:
                status, dt = get(server.port, "/health")
            except OSError:
                status, dt = 0, float("inf")
            health.append(dt if status == 200 else float("inf"))
            stop.wait(0.2)

    p = threading.Thread(target=probe)
    p.start()
    busy0, ours0 = jiffies(ours)
    passes0, seqs0 = rounds(server)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    busy1, ours1 = jiffies(ours)
    other = 100 * max(0, (busy1 - busy0) - (ours1 - ours0)) / os.sysconf("SC_CLK_TCK") / wall
    stop.set()
    p.join()
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    longs = [r for r in ok if r["long"]]
    errors = [r for r in results if r["status"] != 200]
    first_idle = min(idle)
    busy_s, busy_tokens = first_idle - t0, tokens_before(ok, first_idle)
    for r in errors[:3]:
        print(f"  {server.label}: error {r['status']} {r.get('error', '')}", file=sys.stderr)
    return {"server": server.label, "streams": streams, "requests": len(results), "long": len(longs),
            "errors": len(errors), "wall_s": wall, "tokens": sum(r["tokens"] for r in ok),
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "busy_s": busy_s,
            "busy_tokens_per_s": busy_tokens / busy_s,
            "early_eos": sum(1 for r in ok if r["tokens"] < max_tokens), "empty": sum(1 for r in ok if not r["times"]),
            "deltas": sum(len(r["times"]) for r in ok),
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "ttft_long": pct([r["ttft"] for r in longs if r["ttft"] is not None], 0.5),
            "long_prompt_tokens": pct([r["prompt_tokens"] for r in longs], 0.5),
            "itl_p50_ms": 1000 * pct(gaps, 0.5), "itl_p95_ms": 1000 * pct(gaps, 0.95),
            "itl_max_ms": 1000 * max(gaps, default=float("nan")),
            "health_max_ms": 1000 * max(health, default=float("nan")), "other_cpu": other,
            "seqs_per_pass": (at_idle[0][1] - seqs0) / (at_idle[0][0] - passes0) if at_idle[0][0] > passes0 else float("nan")}


def queue_full(model: Path, backend: str, name: str, threads: int, prompt: str) -> dict:
    server = start_rbe(model, backend, threads, "--max-queue", "1", "--slots", "1")
    try:
        statuses, times = [], []
        long = threading.Thread(target=chat, args=(server.port, name, prompt, 200))
        long.start()
        time.sleep(1.0)
        burst = [threading.Thread(target=lambda: statuses.append(_timed(server.port, name, times))) for _ in range(10)]
        for t in burst:
            t.start()
        for t in burst:
            t.join()
        long.join()
        rejected = [dt for s, dt in zip(statuses, times, strict=False) if s == 503]
        return {"burst": len(statuses), "rejected": len(rejected),
                "reject_ms_max": 1000 * max(rejected, default=float("nan"))}
    finally:
        server.stop()


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


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b and not math.isnan(a) and not math.isnan(b) else "—"


def markdown(rows: list[dict], meta: dict, full: dict | None) -> str:
    lines = [MARK_BEGIN, "## Load: `rbe serve` against llama.cpp's `llama-server` (`benchmarks/serve_load.py`)", "",
             f"`{meta['command']}` — {meta['cpu']}, {meta['cores']} cores (shared machine, load average "
             f"{meta['load']} before/after); `{meta['rbe_model']}` (`--backend {meta['backend']} --slots "
             f"{meta['slots']}`) against `{meta['gguf']}` (`llama-server -t {meta['threads']} -tb {meta['threads']} "
             f"--parallel {meta['slots']} -c {meta['slots'] * meta['ctx_per_slot']}`, {meta['ctx_per_slot']} tokens "
             f"a slot; llama.cpp {meta['llama_version']}), {meta['threads']} threads each; both servers up, measured "
             f"in turn, {meta['repeat']} passes per level and server in A B B A order (the pass with the most "
             f"tok/s is the row). Streaming chat, temperature 0, max_tokens {meta['max_tokens']}, {meta['requests']} requests "
             f"per level (each stream takes the next when its last reply is done), {meta['long_requests']} of them a ~{meta['long_tokens']}-token "
             "prompt (a slice of the GPL-3 text, different each pass). gen tok/s: generated tokens (`usage`) over "
             "the level's wall time; all busy: the same from the level's start until the first stream found no "
             "request left (the drain after it, when fewer streams run, left out), and that time; TTFT over all "
             "requests, the long one included (`long`: its own, with its prompt tokens); ITL: gaps between a stream's content deltas, all streams pooled; early EOS: replies "
             "that stopped before max_tokens (the two quantizations answer differently); seqs / pass: sequences a "
             "forward pass advanced on average while all streams were busy (each server's /metrics: rbe's "
             "`rbe_engine_round_sequences`, llama-server's `n_busy_slots_per_decode`); other jobs' CPU: the "
             "machine's busy CPU during the pass less the benchmark's own processes (100 = one core).", "",
             "| server | streams | requests | errors | early EOS | gen tok/s | all busy: tok/s (s) | TTFT p50 s | "
             "TTFT p95 s | TTFT long s (tokens) | ITL p50 ms | ITL p95 ms | ITL max ms | /health max ms | "
             "seqs / pass | other jobs' CPU % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["streams"], r["server"] != RBE)):
        lines.append(f"| {r['server']} | {r['streams']} | {r['requests']} | {r['errors']} | {r['early_eos']} | "
                     f"{r['tokens_per_s']:.1f} | {r['busy_tokens_per_s']:.1f} ({r['busy_s']:.1f}) | "
                     f"{r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | "
                     f"{r['ttft_long']:.2f} ({r['long_prompt_tokens']:.0f}) | {r['itl_p50_ms']:.1f} | "
                     f"{r['itl_p95_ms']:.1f} | {r['itl_max_ms']:.0f} | {r['health_max_ms']:.1f} | "
                     f"{r['seqs_per_pass']:.2f} | {r['other_cpu']:.0f} |")
    by = {(r["server"], r["streams"]): r for r in rows}
    levels = sorted({r["streams"] for r in rows})
    lines += ["", "rbe / llama-server, same run (tok/s: higher is better; latencies: lower is better):", "",
              "| streams | gen tok/s | TTFT p50 | TTFT p95 | TTFT long | ITL p50 | ITL p95 | ITL max |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in levels:
        a, b = by.get((RBE, n)), by.get((LLAMA, n))
        if a and b:
            lines.append(f"| {n} | " + " | ".join(ratio(a[k], b[k]) for k in (
                "tokens_per_s", "ttft_p50", "ttft_p95", "ttft_long", "itl_p50_ms", "itl_p95_ms", "itl_max_ms")) + " |")
    lines += ["", "Targets (issue 26), same run:", ""] + [f"- {t}" for t in targets(by, levels)]
    if full:
        lines += ["", f"Full queue (rbe, `--max-queue 1 --slots 1`, one long request running, a burst of "
                  f"{full['burst']}): {full['rejected']} answered 503, the slowest in {full['reject_ms_max']:.1f} ms."]
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def targets(by: dict, levels: list[int]) -> list[str]:
    out = []
    one = by.get((RBE, 1))
    for key, how in (("tokens_per_s", "over the wall time"), ("busy_tokens_per_s", "while all 8 streams are busy")):
        if one and (RBE, 8) in by:
            x = by[(RBE, 8)][key] / one[key]
            peer = (f" (llama-server: {by[(LLAMA, 8)][key] / by[(LLAMA, 1)][key]:.2f}×)"
                    if (LLAMA, 1) in by and (LLAMA, 8) in by else "")
            out.append(f"rbe, 8 streams ≥ 3× one stream's tok/s, {how}: {x:.2f}×{peer} — "
                       f"{'met' if x >= 3 else 'not met'}")
    for n in (8, 32):
        if (RBE, n) in by and (LLAMA, n) in by:
            x = by[(RBE, n)]["tokens_per_s"] / by[(LLAMA, n)]["tokens_per_s"]
            out.append(f"rbe ≥ 1.0× llama-server's tok/s at {n} streams: {x:.2f}× — {'met' if x >= 1 else 'not met'}")
    for n in levels:
        a, b = by.get((RBE, n)), by.get((LLAMA, n))
        if a and b and a["long"]:
            met = a["ttft_p95"] <= b["ttft_p95"]
            out.append(f"TTFT p95 with the long prompt in the mix ≤ llama-server's, {n} stream{'s' * (n > 1)}: "
                       f"{a['ttft_p95']:.2f} s vs {b['ttft_p95']:.2f} s — {'met' if met else 'not met'}")
    return out


def llama_version(binary: Path) -> str:
    try:
        res = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
        line = next((ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("version")), "")
        return line.split(":", 1)[1].strip() if line else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def report(r: dict) -> None:
    print(f"{r['server']:<13} {r['streams']:>3} streams: {r['tokens_per_s']:7.1f} tok/s (all busy "
          f"{r['busy_tokens_per_s']:.1f} over {r['busy_s']:.1f} s)  TTFT p50/p95 "
          f"{r['ttft_p50']:.2f}/{r['ttft_p95']:.2f} s  long {r['ttft_long']:.2f} s ({r['long_prompt_tokens']:.0f} tok)"
          f"  ITL p50/p95/max {r['itl_p50_ms']:.1f}/{r['itl_p95_ms']:.1f}/{r['itl_max_ms']:.0f} ms  errors "
          f"{r['errors']}  early EOS {r['early_eos']}/{r['requests']} (empty {r['empty']})  deltas/tokens "
          f"{r['deltas']}/{r['tokens']}  wall {r['wall_s']:.1f} s  seqs/pass {r['seqs_per_pass']:.2f}  other jobs "
          f"{r['other_cpu']:.0f}% CPU", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="the .rbe file (default: SmolLM2 int4, converted if missing)")
    p.add_argument("--gguf", type=Path, default=None, help="llama-server's GGUF of the same weights and bits "
                   "(default: SmolLM2 Q4_0, quantized if missing)")
    p.add_argument("--llama-server", type=Path, default=None,
                   help="llama-server binary (default: built into --cache by scale.py's ensure_llama_tools)")
    p.add_argument("--no-llama-server", action="store_true", help="rbe serve alone")
    p.add_argument("--backend", default="cffi")
    p.add_argument("--threads", type=int, default=2, help="compute threads of each server")
    p.add_argument("--levels", default="1,8,32", help="concurrent streams, comma-separated")
    p.add_argument("--requests", type=int, default=64, help="requests per level, spread over its streams")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--long-prompt-tokens", type=int, default=2000, help="0: no long prompts")
    p.add_argument("--long-requests", type=int, default=1, help="long prompts per level (among --requests)")
    p.add_argument("--repeat", type=int, default=2, help="passes per level and server, in A B B A order; the one "
                   "with the most tok/s is kept (these machines are shared and noisy)")
    p.add_argument("--no-queue-test", action="store_true")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rbe-bench")
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "serving.md"))
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    args.cache.mkdir(parents=True, exist_ok=True)
    model = args.model or d.ensure_rbe_files(args.cache, d.smollm2_gguf())["int4"]
    binary = gguf = None
    if not args.no_llama_server:
        gguf = args.gguf
        if gguf is None:
            lib_dir = d.ensure_llama_cpp(args.cache, True)
            gguf = d.ensure_ggufs(args.cache, d.smollm2_gguf(), lib_dir, {"Q4_0": d.GGUF_TYPES["Q4_0"]})["Q4_0"]
        binary = args.llama_server
        if binary is None:
            import scale

            binary = scale.ensure_llama_tools(args.cache) / "llama-server"
    name, slots = model.stem, max(levels)
    ctx_per_slot = args.long_prompt_tokens + args.max_tokens + 512
    n_long = args.long_requests if args.long_prompt_tokens else 0
    longs = long_prompts(model, args.long_prompt_tokens, len(levels) * args.repeat * n_long + 1) if n_long else []
    load_before = os.getloadavg()[0]
    servers = [start_rbe(model, args.backend, args.threads, "--slots", str(slots), "--max-queue", "256")]
    rows = []
    try:
        if binary:
            servers.append(start_llama(binary, gguf, name, args.threads, slots, ctx_per_slot))
        for s in servers:  # warm up: a short request and a long prompt no level uses
            chat(s.port, name, "warm up", 4)
            if longs:
                chat(s.port, name, longs[-1], 4)
        ours = [os.getpid(), *(x.proc.pid for x in servers)]
        for i, n in enumerate(levels):
            first = servers if i % 2 == 0 else servers[::-1]
            best: dict[str, dict] = {}
            for k in range(args.repeat):  # A B B A ...: each pass its own long prompts (no prefix cache hit)
                mine = longs[(i * args.repeat + k) * n_long:(i * args.repeat + k + 1) * n_long]
                plan = schedule(args.requests, mine)
                for s in first if k % 2 == 0 else first[::-1]:
                    r = level(s, name, n, plan, args.max_tokens, set(mine), ours)
                    if s.label not in best or r["tokens_per_s"] > best[s.label]["tokens_per_s"]:
                        best[s.label] = r
                    report(r)
            rows += best.values()
    finally:
        for s in servers:
            s.stop()
    full = None if args.no_queue_test else queue_full(model, args.backend, name, args.threads,
                                                       longs[-1] if longs else PROMPTS[0])
    meta = {"command": d.command_line("serve_load.py", argv), "cpu": d.cpu_name(),
            "cores": len(os.sched_getaffinity(0)), "load": f"{load_before:.1f}/{os.getloadavg()[0]:.1f}",
            "rbe_model": name, "backend": args.backend, "slots": slots, "gguf": gguf.name if gguf else "—",
            "threads": args.threads, "ctx_per_slot": ctx_per_slot,
            "llama_version": llama_version(binary) if binary else "—", "max_tokens": args.max_tokens,
            "requests": args.requests, "long_requests": n_long, "repeat": args.repeat, "long_tokens": args.long_prompt_tokens}
    d.publish(markdown(rows, meta, full), args.out, MARK_BEGIN, MARK_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
