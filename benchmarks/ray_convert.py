"""Distributed conversion on Ray: SmolLM2 with the flagship codec (GPTQ layer by layer), locally and
on a local Ray cluster of 1 and 2 worker CPUs; the files must be bit-identical. Also times each
matrix's calibrated encoding (the part Ray spreads) to project a 7B model on N nodes.

    python benchmarks/ray_convert.py            # writes its section of docs/scaling.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import decode as d  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- benchmarks/ray_convert.py: begin -->", "<!-- benchmarks/ray_convert.py: end -->"
CODEC = json.dumps({"id": "hadamard", "bits": 4, "grid": "normal"})


def run(args: list[str], out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rbe_core.cli", "convert", str(d.smollm2_gguf()), "-o", str(out),
                    "--codec", CODEC, "--quiet", *args], check=True)
    return time.perf_counter() - t0


def on_ray(cpus: int, out: Path, tokens: int) -> float:
    """A conversion on a fresh local Ray cluster of ``cpus`` CPUs (started by this child)."""
    code = f"""
import time, ray, rbe_core
ray.init(num_cpus={cpus}, include_dashboard=False, log_to_driver=False)
t0 = time.perf_counter()
rbe_core.compress_model({str(d.smollm2_gguf())!r}, {str(out)!r}, codec={json.loads(CODEC)!r}, jobs={cpus}, progress=False,
                        calibration_tokens={tokens}, cluster="local")
print(time.perf_counter() - t0)
"""
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def matrix_times(tokens: int) -> dict[str, float]:
    """Seconds of each calibrated encoding in a local conversion, by shape."""
    code = f"""
import json, time, rbe_core
from rbe_core.compression import calibration as c
times = {{}}
plain = c.encode_calibrated
def timed(codec, w, gram, name):
    t0 = time.perf_counter(); out = plain(codec, w, gram, name)
    times.setdefault(str(tuple(w.shape)), []).append(time.perf_counter() - t0); return out
import rbe_core.compression.convert as conv
conv.encode_calibrated = timed
rbe_core.compress_model({str(d.smollm2_gguf())!r}, "/tmp/rbe-matrix-times.rbe", codec={json.loads(CODEC)!r}, progress=False,
                        calibration_tokens={tokens})
print(json.dumps({{k: sum(v) / len(v) for k, v in times.items()}}))
"""
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calibration-tokens", type=int, default=512)
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "scaling.md"))
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rbe-bench")
    args = p.parse_args(argv)
    c = args.cache
    c.mkdir(parents=True, exist_ok=True)
    tok = ["--calibration-tokens", str(args.calibration_tokens)]
    rows = {"local, --jobs 1": run([*tok, "--jobs", "1"], c / "scale-local1.rbe"),
            "Ray, 1 worker CPU": on_ray(1, c / "scale-ray1.rbe", args.calibration_tokens),
            "Ray, 2 worker CPUs": on_ray(2, c / "scale-ray2.rbe", args.calibration_tokens)}
    digests = {n: hashlib.sha256((c / f).read_bytes()).hexdigest()[:16] for n, f in
               (("local1", "scale-local1.rbe"), ("ray1", "scale-ray1.rbe"), ("ray2", "scale-ray2.rbe"))}
    times = matrix_times(args.calibration_tokens)
    cpu = d.cpu_name()
    base = rows["local, --jobs 1"]
    lines = [MARK_BEGIN, "## SmolLM2 conversion, local vs Ray (`benchmarks/ray_convert.py`)", "",
             f"`python benchmarks/ray_convert.py` — {cpu}, 2 cores; `--codec '{CODEC}'` (GPTQ on every Linear, "
             f"{args.calibration_tokens} calibration tokens); the Ray cluster is local (`ray.init(num_cpus=N)`), on "
             "the same 2 cores as the driver.", "",
             "| run | seconds | vs local --jobs 1 |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.0f} | {base / v:.2f}× |" for k, v in rows.items()]
    same = len(set(digests.values())) == 1
    lines += ["", f"Files bit-identical: **{'yes' if same else 'no'}** (sha256 prefixes {digests}); calibrated "
              "files can differ between any two runs, local ones included, because the driver's forward passes "
              "(MKL) that build the Hessians are not bit-reproducible here; uncalibrated conversions and the GPTQ "
              "tasks given the same Hessians are (tests/rbe_core/distributed).", "",
              "Mean seconds of one matrix's calibrated encoding (GPTQ), by shape (rows, cols):", "",
              "| shape | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in sorted(times.items())]
    lines.append(MARK_END)
    text = "\n".join(lines) + "\n"
    d.publish(text, args.out, MARK_BEGIN, MARK_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
