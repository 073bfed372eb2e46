"""Training step (forward + backward + optimizer) of a stack of compressed Linear layers vs the same
dense float32 stack in torch, in one run. Updates the speed section of docs/training.md (the
sections after it are kept), or prints with --print.

    python benchmarks/training.py [--width 1024] [--depth 4] [--batch 256] [--steps 10] [--codec int8]
                                  [--threads N] [--backends cffi,torch,numpy]

Each model runs in its own subprocess, so its peak memory is its own. The subprocesses take
turns one step at a time (dense step, compressed step, dense step, ...; the others wait idle), and
a model's step time is the median of its steps, so a burst of load from other processes hits
every model alike and is not read as a speed difference. ``--threads N``
runs both models on N threads (torch, the cffi kernels and numpy's BLAS alike); on a machine
whose cores other jobs keep busy, one thread gives the steadiest ratio. ``--backends`` adds one
compressed model per named backend to the turns (default: the current backend), each compared
with the same dense steps. Peak memory is the peak resident set size
(Linux ``VmHWM``, reset after the model is built where ``/proc/self/clear_refs`` allows it, else
``getrusage`` max RSS) minus the resident size measured right after the imports.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import rbe_core
from rbe_core.layers import RBELinear
from rbe_core.training.trainable import prepare_for_training


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_kib() -> int:
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _dense_stack(width: int, depth: int) -> nn.Sequential:
    gen = torch.Generator().manual_seed(0)
    dense = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    for m in dense:
        nn.init.normal_(m.weight, std=width**-0.5, generator=gen)
    return dense


def _compressed_stack(width: int, depth: int, codec: str, backend) -> nn.Sequential:
    enc = rbe_core.get_codec(codec)
    dense = _dense_stack(width, depth)
    layers = [RBELinear.from_encoded(enc.encode(m.weight.detach()), m.bias.detach().clone(), backend)
              for m in dense]
    del dense
    return nn.Sequential(*layers)


def _state_bytes(model: nn.Module) -> int:
    """Bytes of parameters + their gradients + Adam moments + encoded payloads held by ``model``."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    payload = sum(m.encoded.payload_nbytes for m in model.modules() if hasattr(m, "encoded"))
    return 4 * params + payload  # param, grad, exp_avg, exp_avg_sq


def _child(args) -> dict:
    """Build one model, run the steps, report time and memory (runs in its own process)."""
    baseline = _status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    backend = rbe_core.get_backend()
    if args.child == "dense":
        model = _dense_stack(args.width, args.depth)
    else:
        model = _compressed_stack(args.width, args.depth, args.codec, backend)
        prepare_for_training(model, engine=args.engine)
    gc.collect()
    built = _status_kib("VmRSS") or 0
    reset = _reset_peak()
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocates optimizer state)
    print("ready", flush=True)
    times = []
    for command in sys.stdin:  # the parent's turns: "step" runs one, anything else ends
        if command.strip() != "step":
            break
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        print(times[-1], flush=True)
    return {"sec": statistics.median(times), "state": _state_bytes(model), "model_kib": built - baseline,
            "peak_kib": _peak_kib() - baseline, "reset": reset, "backend": backend.name,
            "threads": torch.get_num_threads()}


def _start_child(kind: str, argv: list[str], threads: int | None, backend: str | None) -> subprocess.Popen:
    """A child that builds its model, warms up, then runs one step per "step" line on its stdin."""
    env = dict(os.environ)
    if backend:
        env["RBE_BACKEND"] = backend
    if threads:
        for var in ("RBE_CFFI_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    proc = subprocess.Popen([sys.executable, __file__, *argv, "--child", kind], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"benchmark child {kind} ({backend or 'default backend'}) failed to start")
    return proc


def _interleaved(children: list[subprocess.Popen], steps: int) -> list[dict]:
    """Run ``steps`` turns (one step of each child in order); each child's final report."""
    for _ in range(steps):
        for proc in children:
            proc.stdin.write("step\n")
            proc.stdin.flush()
            proc.stdout.readline()
    reports = []
    for proc in children:
        out, _ = proc.communicate("done\n")
        if proc.returncode:
            raise RuntimeError(f"benchmark child exited with {proc.returncode}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--engine", default="autograd")
    ap.add_argument("--threads", type=int, default=None, help="threads for both models (default: torch's)")
    ap.add_argument("--backends", default=None, help="comma-separated backends for the compressed model")
    ap.add_argument("--print", dest="to_stdout", action="store_true")
    ap.add_argument("--child", choices=("dense", "compressed"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    argv = ["--width", str(args.width), "--depth", str(args.depth), "--batch", str(args.batch),
            "--steps", str(args.steps), "--codec", args.codec, "--engine", args.engine]
    backends = args.backends.split(",") if args.backends else [None]
    # one child at a time is started (its build and warm-up alone); then they take turns
    children = [_start_child("dense", argv, args.threads, None)]
    children += [_start_child("compressed", argv, args.threads, b) for b in backends]
    dense, *comps = _interleaved(children, args.steps)
    rows = [("dense fp32", dense)] + [(f"{args.codec} codec params ({args.engine}), backend `{c['backend']}`", c)
                                      for c in comps]
    peak_note = ("VmHWM reset after the model is built (`/proc/self/clear_refs`)"
                 if all(r["reset"] for _, r in rows)
                 else "max RSS of the whole process (the peak could not be reset after the build)")
    env = f"RBE_BACKEND={os.environ['RBE_BACKEND']} " if os.environ.get("RBE_BACKEND") and not args.backends else ""
    extra = (f" --threads {args.threads}" if args.threads else "") + (f" --backends {args.backends}" if args.backends else "")
    lines = [
        "# Training in the compressed domain: step time and memory",
        "",
        f"`{env}python benchmarks/training.py {' '.join(argv)}{extra}` on {platform.machine()}, "
        f"torch {torch.__version__}, {dense['threads']} threads, "
        f"load average {os.getloadavg()[0]:.2f} at the end.",
        "",
        "One step = forward + backward + Adam update of a stack of Linear layers (MSE of the output);",
        "the models' subprocesses take turns one step at a time; step time = each model's median step.",
        "Compressed: `prepare_for_training` (codec parameters trainable, grad_input from the codes",
        "through the backend, parameter gradients from the engine). Each model runs in its own",
        "subprocess. State = trainable parameters x4 (value, gradient, two Adam moments) + encoded",
        "payloads (computed); model RSS = resident memory after building the model minus the",
        "resident memory after the imports; peak RSS = the process's peak resident memory over the",
        f"steps minus that same post-import baseline ({peak_note}).",
        "",
        "| model | step ms | state MiB | model RSS MiB | peak RSS MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {1e3 * r['sec']:.1f} | {r['state'] / 2**20:.2f} | {r['model_kib'] / 1024:.1f} "
                     f"| {r['peak_kib'] / 1024:.1f} |")
    lines.append("")
    for c in comps:
        lines.append(f"Backend `{c['backend']}`: step-time ratio compressed / dense **{c['sec'] / dense['sec']:.2f}x** "
                     f"(target <= 1.5x); peak-memory ratio **{c['peak_kib'] / max(dense['peak_kib'], 1):.2f}x** "
                     "(target <= 1x).")
    lines.append("")
    text = "\n".join(lines)
    if args.to_stdout:
        print(text)
        return
    out = Path(__file__).resolve().parent.parent / "docs" / "training.md"
    old = out.read_text() if out.exists() else ""
    keep = old[old.index("\n## "):] if "\n## " in old else ""
    out.write_text(text + ("\n" + keep.lstrip("\n") if keep else ""))
    print(text)


if __name__ == "__main__":
    main()
