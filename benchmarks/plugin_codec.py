"""A third-party codec on real SmolLM2: native speed, calibrated conversion and training, against
a built-in codec of the same bits in the same run.

The example plugin (``examples/rbe-codec-example``: ``example-nf``, normal-float codes with a
float16 absmax per group of 64) is installed as its own distribution; nothing in rbe knows it.
Measured, each variant in its own process:

- decode / prefill tokens/s through the native engine (cffi), ``example-nf`` 4-bit against the
  built-in ``int4`` (both 4.25 bits/weight), and ``example-nf`` 3-bit; the same codec with its
  lowering switched off (the generic path: the codec's numpy decode in the torch modules), with
  and without the decoded-weight cache (``RBE_DECODED_CACHE_MB``);
- quality on held-out text (``/usr/share/common-licenses/GPL-3``, never used for calibration or
  training) of 3-bit round-to-nearest vs GPTQ on the plugin's grid (``rbe convert`` calibrates
  any codec that lowers and lifts) and of a ``--target-bpw 3.5`` mix of its bit settings;
- ``rbe finetune`` of the 3-bit model's codec parameters (distillation from the float model, on
  rbe's calibration text) and the same with the ``lsq`` quantizer: KL on the held-out text before
  and after.

    pip install --no-deps --no-build-isolation examples/rbe-codec-example
    python benchmarks/plugin_codec.py            # writes its section of docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import decode as d  # noqa: E402  (the SmolLM2 source, prompt and timing helpers)

MARK_BEGIN, MARK_END = "<!-- benchmarks/plugin_codec.py: begin -->", "<!-- benchmarks/plugin_codec.py: end -->"
CALIBRATION = Path(__file__).parents[1] / "rbe_core" / "data" / "calibration.txt"


def run_generic(path: str, threads: int, prompt: list[int], new: int, cache_mb: int) -> dict:
    """``run_rbe`` of the torch modules with the codec's lowering switched off (the generic path)."""
    os.environ["RBE_DECODED_CACHE_MB"] = str(cache_mb)
    import rbe_core
    from rbe_core.abc import Codec

    type(rbe_core.get_codec("example-nf")).lower = Codec.lower
    return d.run_rbe(path, "torch", False, threads, prompt, new)


def run_eval(path: str, reference: str, max_tokens: int) -> dict:
    from rbe_core.compression.evaluate import evaluate

    return evaluate(path, d.TEXT.read_text(), reference, max_tokens=max_tokens, dense=True)


def child(fn: str, *args) -> dict:
    code = ("import json, sys; sys.path.insert(0, {here!r}); import plugin_codec as p; "
            "r = getattr(p, {fn!r})(*json.loads(sys.argv[1])); print(json.dumps(r))")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OPENBLAS_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code.format(here=str(Path(__file__).parent), fn=fn), json.dumps(args)],
                         capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{fn}{args[:2]} failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


run_rbe = d.run_rbe


def convert(src: Path, out: Path, *args: str) -> float:
    """Seconds to convert (0 when ``out`` is cached)."""
    if out.exists():
        return 0.0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rbe_core.cli", "convert", str(src), "-o", str(out), *args, "--quiet"],
                   check=True)
    return time.perf_counter() - t0


def finetune(path: Path, src: Path, out: Path, quantizer: str | None, steps: int) -> dict:
    args = ["finetune", str(path), "--data", str(CALIBRATION), "--teacher", str(src), "--steps", str(steps),
            "--seq-len", "128", "--batch-tokens", "512", "--lr", "1e-3" if quantizer is None else "5e-5",
            "-o", str(out), "--quiet"]
    if quantizer:
        args += ["--quantizer", quantizer]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rbe_core.cli", *args], check=True)
    return {"seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=40, help="fine-tuning steps")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rbe-bench")
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "performance.md"))
    args = p.parse_args(argv)
    try:
        import rbe_codec_example  # noqa: F401
    except ImportError:
        sys.exit("plugin_codec.py: pip install --no-deps --no-build-isolation examples/rbe-codec-example first")
    args.cache.mkdir(parents=True, exist_ok=True)
    src = d.smollm2_gguf()
    c = args.cache
    files = {"int4": c / "smol-int4.rbe", "nf4": c / "smol-nf4.rbe", "nf3": c / "smol-nf3.rbe",
             "nf3-gptq": c / "smol-nf3-gptq.rbe", "nf-3.5": c / "smol-nf-3.5.rbe"}
    conv = {
        "int4": convert(src, files["int4"], "--codec", "int4"),
        "nf4": convert(src, files["nf4"], "--codec", '{"id": "example-nf", "bits": 4}', "--no-calibration"),
        "nf3": convert(src, files["nf3"], "--codec", "example-nf", "--no-calibration"),
        "nf3-gptq": convert(src, files["nf3-gptq"], "--codec", "example-nf"),
        "nf-3.5": convert(src, files["nf-3.5"], "--codec", "example-nf", "--target-bpw", "3.5"),
    }
    prompt = d.prompt_ids(files["int4"], args.prompt_tokens)
    speed: dict[str, list[dict]] = {}
    variants = [("rbe int4 (built-in)", "run_rbe", (str(files["int4"]), "native", False)),
                ("example-nf 4-bit (plugin)", "run_rbe", (str(files["nf4"]), "native", False)),
                ("example-nf 3-bit (plugin)", "run_rbe", (str(files["nf3"]), "native", False))]
    for _ in range(args.repeat):  # interleaved, so drift in the machine's load hits every variant alike
        for name, fn, a in variants:
            speed.setdefault(name, []).append(child(fn, *a, args.threads, prompt, args.new_tokens))
    generic = {mb: child("run_generic", str(files["nf3"]), args.threads, prompt[:32], 8, mb) for mb in (0, 1024)}
    tuned = {q or "codec parameters": c / f"smol-nf3-ft-{q or 'params'}.rbe" for q in (None, "lsq")}
    ft = {}
    for q, out in tuned.items():
        if not out.exists():
            ft[q] = finetune(files["nf3"], src, out, None if q == "codec parameters" else q, args.steps)
    quality = {k: child("run_eval", str(v), str(src), args.eval_tokens)
               for k, v in {**files, **{f"nf3 + finetune ({q})": p for q, p in tuned.items()}}.items()}
    d.publish(report(args, speed, generic, quality, conv, ft), args.out, MARK_BEGIN, MARK_END)
    return 0


def report(args, speed, generic, quality, conv, ft) -> str:
    best = {k: {m: max(r[m] for r in v) for m in ("prefill", "decode")} for k, v in speed.items()}
    base = best["rbe int4 (built-in)"]
    cpu = d.cpu_name()
    lines = [MARK_BEGIN, "## A third-party codec plugin on SmolLM2 (`benchmarks/plugin_codec.py`)", "",
             f"`python benchmarks/plugin_codec.py` — {cpu}, {args.threads} threads, prompt {args.prompt_tokens} "
             f"tokens, {args.new_tokens} decoded, best of {args.repeat} interleaved runs, each in its own process.",
             "", "| variant | prefill tok/s | decode tok/s | decode vs int4 |", "|---|---:|---:|---:|"]
    for name, b in best.items():
        lines.append(f"| {name} | {b['prefill']:.0f} | {b['decode']:.1f} | {b['decode'] / base['decode']:.2f}× |")
    for mb, r in generic.items():
        label = "off" if mb == 0 else f"{mb} MiB"
        lines.append(f"| example-nf 3-bit, lowering off: generic path, decoded-weight cache {label} | "
                     f"{r['prefill']:.1f} | {r['decode']:.2f} | {r['decode'] / base['decode']:.3f}× |")
    lines += ["", f"Quality on held-out text (GPL-3 licence text, first {args.eval_tokens} tokens; KL and top-1 "
              "against the float model):", "",
              "| model | bits/weight | perplexity | KL | top-1 | convert s |", "|---|---:|---:|---:|---:|---:|"]
    for name, q in quality.items():
        lines.append(f"| {name} | {q['bits_per_weight']:.3f} | {q['perplexity']:.2f} | {q['kl']:.4f} | "
                     f"{q['top1_agreement']:.3f} | {conv.get(name, 0):.0f} |")
    if ft:
        lines += ["", "Fine-tuning wall time: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in ft.items())
                  + f" ({args.steps} steps of 512 tokens)."]
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
