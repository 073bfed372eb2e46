"""Training step (forward + backward + optimizer) of a stack of compressed Linear layers vs the same
dense float32 stack in torch, in one run. Writes docs/training.md (or prints with --print).

    python benchmarks/training.py [--width 1024] [--depth 4] [--batch 256] [--steps 10] [--codec int8]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
import tracemalloc
from pathlib import Path

import torch
from torch import nn

import rbe_core
from rbe_core.layers import RBELinear
from rbe_core.training import prepare_for_training


def _stacks(width: int, depth: int, codec: str, backend):
    gen = torch.Generator().manual_seed(0)
    dense = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    for m in dense:
        nn.init.normal_(m.weight, std=width**-0.5, generator=gen)
    enc = rbe_core.get_codec(codec)
    compressed = nn.Sequential(*[RBELinear.from_encoded(enc.encode(m.weight.detach()), m.bias.detach(), backend)
                                 for m in dense])
    return dense, compressed


def _time_steps(model: nn.Module, x: torch.Tensor, steps: int) -> tuple[float, int]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocates optimizer state)
    tracemalloc.start()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = (time.perf_counter() - t0) / steps
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak


def _state_bytes(model: nn.Module) -> int:
    """Bytes of parameters + their gradients + Adam moments + encoded payloads held by ``model``."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    payload = sum(m.encoded.payload_nbytes for m in model.modules() if hasattr(m, "encoded"))
    return 4 * params + payload  # param, grad, exp_avg, exp_avg_sq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--engine", default="autograd")
    ap.add_argument("--print", dest="to_stdout", action="store_true")
    args = ap.parse_args()
    backend = rbe_core.get_backend()
    dense, compressed = _stacks(args.width, args.depth, args.codec, backend)
    prepare_for_training(compressed, engine=args.engine)
    for p in dense.parameters():
        p.requires_grad_(True)
    x = torch.randn(args.batch, args.width)
    rows = []
    for name, model in (("dense fp32", dense), (f"{args.codec} codec params ({args.engine})", compressed)):
        sec, traced = _time_steps(model, x, args.steps)
        rows.append((name, sec, _state_bytes(model), traced))
    ratio = rows[1][1] / rows[0][1]
    lines = [
        "# Training in the compressed domain: step time and memory",
        "",
        f"`python benchmarks/training.py --width {args.width} --depth {args.depth} --batch {args.batch} "
        f"--steps {args.steps} --codec {args.codec} --engine {args.engine}` on {platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend `{backend.name}`.",
        "",
        "One step = forward + backward + Adam update of a stack of Linear layers (MSE of the output).",
        "Compressed: `prepare_for_training` (codec parameters trainable, grad_input from the codes",
        "through the backend, parameter gradients from the engine). State = trainable parameters x4",
        "(value, gradient, two Adam moments) + encoded payloads; traced = peak numpy/Python allocations",
        "during the steps (tracemalloc; torch's own allocator is not traced).",
        "",
        "| model | step ms | state MiB | traced peak MiB |",
        "|---|---:|---:|---:|",
    ]
    for name, sec, state, traced in rows:
        lines.append(f"| {name} | {1e3 * sec:.1f} | {state / 2**20:.2f} | {traced / 2**20:.2f} |")
    lines += ["", f"Step-time ratio compressed / dense: **{ratio:.2f}x** (target <= 1.5x).",
              f"Process max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB.", ""]
    text = "\n".join(lines)
    if args.to_stdout:
        print(text)
    else:
        out = Path(__file__).resolve().parent.parent / "docs" / "training.md"
        out.write_text(text)
        print(text)


if __name__ == "__main__":
    main()
