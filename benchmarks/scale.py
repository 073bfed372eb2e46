"""Real size: rbe against llama.cpp at the 1B and 8B Llama shapes and a mixture-of-experts shape,
on random weights.

    python benchmarks/scale.py --shape 1b                      # make, convert, measure, print
    python benchmarks/scale.py --shape 1b 8b --out docs/performance.md
    python benchmarks/scale.py --shape moe --out docs/families.md   # Qwen3-MoE architecture
    python benchmarks/scale.py --shape 1b --only-gguf PATH     # just write the synthetic F16 GGUF

Speed and memory do not depend on the weights' values, so a seeded random model of a real shape
measures them honestly (quality needs real weights: benchmarks/quality.py). Per shape:

1. an F16 GGUF of the shape (``SHAPES``), written tensor by tensor with the ``gguf`` package
   (bounded memory at 8B), SmolLM2's tokenizer copied in (vocabulary 49152);
2. conversions, each timed in its own process with its peak RSS (``ru_maxrss``):
   ``rbe convert`` (hadamard 4-bit, trellis 4-bit and int4, ``--no-calibration``) and llama.cpp's own
   ``llama-quantize`` (IQ4_XS and Q4_0, no importance matrix);
3. the machine's read bandwidth just before every run (``bandwidth()``: a C loop reading 1 GiB
   with every thread): shared machines drift by a third within minutes, so each decode is set
   against the bandwidth probed next to it;
4. prefill and greedy decode, every variant in a fresh process, rounds interleaved, medians:
   rbe's native engine through ``load_inference`` (what ``rbe infer`` runs; no torch) and
   llama.cpp through llama-cpp-python; each decode's share of the read bandwidth is its weight
   bytes per token times tokens per second over the bandwidth probed before that run (median over
   the rounds).

llama.cpp's tools are built from the source vendored in the ``llama-cpp-python`` sdist
(``ensure_llama_tools``) and llama-cpp-python itself by ``benchmarks/decode.py``'s
``ensure_llama_cpp``; both live in ``--cache`` (default ``~/.cache/rbe-bench``), never in rbe.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import decode as d  # noqa: E402  (llama-cpp-python build + worker, ISA flags, CPU name, publishing)

#: name -> (hidden, layers, heads, kv heads, ffn, vocab[, experts, experts per token]): Llama, or
#: with experts Qwen3-MoE (q/k norms, a router and per-expert MLPs of width ffn in every layer;
#: "moe" has Qwen3-30B-A3B's widths at a quarter of its depth and experts: 1.9B weights, 0.4B active)
SHAPES = {"1b": (2048, 16, 32, 8, 8192, 49152), "8b": (4096, 32, 32, 8, 14336, 49152),
          "moe": (2048, 12, 32, 4, 768, 49152, 32, 4)}
RBE_CODECS = {"rbe hadamard 4-bit": '{"id": "hadamard", "bits": 4}', "rbe trellis 4-bit": '{"id": "trellis", "bits": 4}',
              "rbe int4": "int4"}
LLAMA_TYPES = {"llama.cpp IQ4_XS": "IQ4_XS", "llama.cpp Q4_0": "Q4_0"}
#: each rbe variant's llama.cpp peer for the ratios
PEERS = {"rbe hadamard 4-bit": "llama.cpp IQ4_XS", "rbe trellis 4-bit": "llama.cpp IQ4_XS", "rbe int4": "llama.cpp Q4_0"}
#: built by ``ensure_llama_tools`` (llama-server: for ``benchmarks/serve_load.py``)
TOOLS = ("llama-quantize", "llama-imatrix", "llama-bench", "llama-simple", "llama-server")
MARK_BEGIN, MARK_END = "<!-- benchmarks/scale.py: begin -->", "<!-- benchmarks/scale.py: end -->"


def default_variants() -> list[str]:
    """Every variant, but the trellis one only where the engine has its byte-permute kernels
    (AVX-512 VBMI): elsewhere it looks each weight up by gathers (docs/codecs/trellis.md), and at
    the 8B shape its conversion and runs alone would take most of an hour."""
    names = [*RBE_CODECS, *LLAMA_TYPES]
    if "avx512vbmi" in d.cpu_flags():
        return names
    print("scale.py: no AVX-512 VBMI here: 'rbe trellis 4-bit' left out (name it in --variants to run it)")
    return [n for n in names if n != "rbe trellis 4-bit"]


# ---- the synthetic model ----------------------------------------------------------------------


def tensor_plan(shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF tensor name, numpy shape) of a model of ``shape``, in file order."""
    hidden, layers, heads, kv_heads, ffn, vocab, *moe = shape
    head_dim = hidden // heads
    kv = head_dim * kv_heads
    out = [("token_embd.weight", (vocab, hidden))]
    for i in range(layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (hidden,)), (b + "attn_q.weight", (hidden, hidden)),
                (b + "attn_k.weight", (kv, hidden)), (b + "attn_v.weight", (kv, hidden)),
                (b + "attn_output.weight", (hidden, hidden)), (b + "ffn_norm.weight", (hidden,))]
        if moe:
            experts = moe[0]
            out += [(b + "attn_q_norm.weight", (head_dim,)), (b + "attn_k_norm.weight", (head_dim,)),
                    (b + "ffn_gate_inp.weight", (experts, hidden)), (b + "ffn_gate_exps.weight", (experts, ffn, hidden)),
                    (b + "ffn_up_exps.weight", (experts, ffn, hidden)), (b + "ffn_down_exps.weight", (experts, hidden, ffn))]
        else:
            out += [(b + "ffn_gate.weight", (ffn, hidden)), (b + "ffn_up.weight", (ffn, hidden)),
                    (b + "ffn_down.weight", (hidden, ffn))]
    return out + [("output_norm.weight", (hidden,)), ("output.weight", (vocab, hidden))]


def synthetic_tensor(name: str, shape: tuple[int, ...], seed: int):
    """Norms are ones (float32, as llama.cpp keeps them); matrices N(0, 1/fan_in) in float16."""
    import numpy as np

    if len(shape) == 1:
        return np.ones(shape, np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty(shape, np.float16)
    flat = out.reshape(-1, shape[-1])  # experts' matrices stacked
    for r in range(0, flat.shape[0], 1024):  # in slabs: no float64 copy of an 8B-shape matrix
        flat[r:r + 1024] = rng.standard_normal((min(1024, flat.shape[0] - r), shape[-1]), np.float32) / np.sqrt(shape[-1])
    return out


def write_gguf(shape_name: str, path: Path) -> None:
    """The synthetic F16 GGUF of ``SHAPES[shape_name]``, one tensor in memory at a time."""
    import gguf
    import numpy as np

    hidden, layers, heads, kv_heads, ffn, vocab, *moe = SHAPES[shape_name]
    tok = gguf.GGUFReader(str(d.smollm2_gguf()))
    arch = "qwen3moe" if moe else "llama"
    w = gguf.GGUFWriter(str(path.with_suffix(".tmp")), arch)
    w.add_name(f"rbe synthetic {arch} {shape_name}")
    w.add_block_count(layers)
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    if moe:
        w.add_expert_count(moe[0])
        w.add_expert_used_count(moe[1])
        w.add_expert_feed_forward_length(ffn)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, field in tok.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            w.add_key_value(key, field.contents(), vtype,
                            sub_type=field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None)
    plan = tensor_plan(SHAPES[shape_name])
    for name, shp in plan:
        dtype = np.float32 if len(shp) == 1 else np.float16
        w.add_tensor_info(name, shp, np.dtype(dtype), int(np.prod(shp)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, shp) in enumerate(plan):
        w.write_tensor_data(synthetic_tensor(name, shp, seed=i))
    w.close()
    os.replace(path.with_suffix(".tmp"), path)


def weight_bytes_per_token(path: Path, shape: tuple[int, ...]) -> int:
    """Bytes of matrices one decode step reads: every matrix but the embedding table (one row);
    of the experts' matrices, the share of the experts a token uses."""
    used = shape[7] / shape[6] if len(shape) > 6 else 1.0

    def share(name: str) -> float:
        return used if "_exps" in name else 1.0

    if path.suffix == ".gguf":
        import gguf

        return int(sum(int(t.n_bytes) * share(t.name) for t in gguf.GGUFReader(str(path)).tensors
                       if t.name != "token_embd.weight"))
    from rbe_core.files import open as open_rbe

    with open_rbe(path) as f:
        tied = not any(n in ("lm_head.weight", "output.weight") for n in f)
        return int(sum(sum(a.nbytes for a in f[n].payload.values()) * share(n) for n in f
                       if tied or n not in ("model.embed_tokens.weight", "token_embd.weight")))


# ---- llama.cpp's tools --------------------------------------------------------------------------


def ensure_llama_tools(cache: Path) -> Path:
    """The bin folder of llama.cpp's tools built from the llama-cpp-python sdist's vendored source."""
    import hashlib

    args = d.cmake_args().replace("-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_EXAMPLES=ON")
    root = cache / f"llama-tools-{d.LLAMA_CPP_VERSION}-{hashlib.sha256(args.encode()).hexdigest()[:8]}"
    bin_dir = root / "build" / "bin"
    if all((bin_dir / t).exists() for t in TOOLS):
        return bin_dir
    sdist = root / f"llama_cpp_python-{d.LLAMA_CPP_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d",
                        str(root), f"llama-cpp-python=={d.LLAMA_CPP_VERSION}"], check=True)
    src = root / "src"
    if not src.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(root / "unpack", filter="data")
        os.replace(root / "unpack" / f"llama_cpp_python-{d.LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp", src)
    print(f"building llama.cpp tools into {bin_dir} (a long C++ build) ...", file=sys.stderr)
    # llama-server without its web UI: the UI's assets would come from npm or a download
    subprocess.run(["cmake", "-S", str(src), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF",
                    "-DLLAMA_USE_PREBUILT_UI=OFF", *args.split()], check=True)
    subprocess.run(["cmake", "--build", str(root / "build"), "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
                   check=True)
    return bin_dir


# ---- measuring ------------------------------------------------------------------------------------


def timed(command: list[str], env: dict | None = None) -> dict:
    """Run ``command`` (output kept in a file); wall seconds and peak RSS in MB, or exit with its log."""
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        log.seek(0)
        text = log.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"scale.py: {' '.join(command)} failed:\n{text[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024.0, "log": text}


BANDWIDTH_C = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define BYTES (1L << 30)
static char *buf; static int nth; static volatile float sink[64];
static void *reader(void *arg) {
    long t = (long)arg, chunk = BYTES / nth; const float *p = (const float *)(buf + t * chunk);
    __m256 a = _mm256_setzero_ps(), b = a, c = a, e = a;
    for (long i = 0; i < chunk / 4; i += 32) {
        a = _mm256_add_ps(a, _mm256_load_ps(p + i)); b = _mm256_add_ps(b, _mm256_load_ps(p + i + 8));
        c = _mm256_add_ps(c, _mm256_load_ps(p + i + 16)); e = _mm256_add_ps(e, _mm256_load_ps(p + i + 24));
    }
    float o[8]; _mm256_storeu_ps(o, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, e))); sink[t] = o[0];
    return NULL;
}
int main(int argc, char **argv) {
    nth = atoi(argv[1]); buf = aligned_alloc(64, BYTES); memset(buf, 1, BYTES);
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        struct timespec a, b; pthread_t th[64]; clock_gettime(CLOCK_MONOTONIC, &a);
        for (long t = 0; t < nth; t++) pthread_create(&th[t], NULL, reader, (void *)t);
        for (int t = 0; t < nth; t++) pthread_join(th[t], NULL);
        clock_gettime(CLOCK_MONOTONIC, &b);
        double s = (b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec);
        if (BYTES / s > best) best = BYTES / s;
    }
    printf("%.3f\n", best / 1e9); return 0;
}
"""


@functools.cache
def bandwidth_probe() -> Path:
    """The compiled ``BANDWIDTH_C`` (in a directory that lives as long as this process)."""
    tmp = Path(tempfile.mkdtemp(prefix="rbe-bw-"))
    atexit.register(shutil.rmtree, tmp, True)
    (tmp / "bw.c").write_text(BANDWIDTH_C)
    subprocess.run(["gcc", "-O2", "-mavx", "-pthread", str(tmp / "bw.c"), "-o", str(tmp / "bw")], check=True)
    return tmp / "bw"


def bandwidth(threads: int) -> float:
    """Read bandwidth in GB/s: ``threads`` threads summing disjoint slices of 1 GiB, best of 5."""
    return float(subprocess.run([str(bandwidth_probe()), str(threads)], capture_output=True, text=True,
                                check=True).stdout)


def run_rbe(path: str, threads: int, prompt: list[int], new: int) -> dict:
    """Prefill and decode through ``load_inference`` (the native engine, as ``rbe infer``), in this process."""
    os.environ["RBE_CFFI_THREADS"] = str(threads)
    from rbe_core.models.loading import load_inference

    t0 = time.perf_counter()
    model = load_inference(path, "cffi", engine="native")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, state = model.start(prompt)
    prefill = len(prompt) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(new):
        logits, state = model.step(int(logits.argmax()), state)
    return {"prefill": prefill, "decode": new / (time.perf_counter() - t0), "load_s": load_s}


def in_child(fn: str, *args) -> dict:
    """``fn`` of this module (or of decode.py, as ``d.NAME``) in a fresh interpreter, plus its peak RSS."""
    code = ("import json, sys; sys.path.insert(0, {here!r}); import scale as s; d = s.d; "
            "r = eval({fn!r})(*json.loads(sys.argv[1])); r['peak_rss_mb'] = d.peak_rss_mb(); print(json.dumps(r))")
    res = subprocess.run([sys.executable, "-c", code.format(here=str(Path(__file__).parent), fn=fn), json.dumps(args)],
                         capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"scale.py: {fn}{args[:1]} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def prompt_tokens(n: int) -> list[int]:
    """``n`` token ids of real English text (the ids do not change the speed; any in-vocabulary run works)."""
    import gguf

    from rbe_core.models.sources import gguf_metadata, gguf_tokenizer_json
    from rbe_core.models.spec import load_tokenizer

    tok = load_tokenizer(gguf_tokenizer_json(gguf_metadata(gguf.GGUFReader(str(d.smollm2_gguf())))))
    text = d.TEXT.read_text() if d.TEXT.exists() else Path(__file__).read_text()
    ids = tok.encode(text).ids
    return (ids * (n // len(ids) + 1))[:n]


# ---- one shape ------------------------------------------------------------------------------------


def prepare(shape: str, cache: Path, tools: Path, reconvert: bool,
            variants: list[str]) -> tuple[dict[str, Path], dict[str, dict]]:
    """The model files of the named variants (made when missing, or all again with ``reconvert``)
    and each conversion's time and peak RSS (kept beside the file as ``FILE.convert.json``)."""
    f16 = cache / f"scale-{shape}-f16.gguf"
    if not f16.exists():
        t0 = time.perf_counter()
        write_gguf(shape, f16)
        print(f"{f16}: written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    commands = {name: [sys.executable, "-m", "rbe_core.cli", "convert", str(f16), "-o",
                       str(cache / f"scale-{shape}-{name.split()[1]}.rbe"), "--codec", codec, "--no-calibration",
                       "--quiet"] for name, codec in RBE_CODECS.items()}
    commands.update({name: [str(tools / "llama-quantize"), str(f16), str(cache / f"scale-{shape}-{qtype}.gguf"),
                            qtype, str(os.cpu_count() or 2)] for name, qtype in LLAMA_TYPES.items()})
    files, conversions = {}, {}
    for name, command in ((name, commands[name]) for name in variants):
        files[name] = path = Path(command[6] if name.startswith("rbe") else command[2])
        record = path.with_name(path.name + ".convert.json")
        if reconvert or not path.exists() or not record.exists():
            path.unlink(missing_ok=True)
            stats = timed(command)
            stats.pop("log")
            record.write_text(json.dumps(stats))
            print(f"{shape} convert {name}: {stats['seconds']:.0f} s, peak RSS {stats['peak_rss_mb']:.0f} MB",
                  file=sys.stderr)
        conversions[name] = json.loads(record.read_text())
    return files, conversions


def warm_page_cache(path: Path) -> None:
    """Read ``path`` once, so that a run starts with its file in the page cache (as the table
    states), not partly evicted by the previous variant's."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def measure(shape: str, files: dict[str, Path], lib_dir: Path, args) -> dict[str, dict]:
    """Medians over interleaved rounds of every variant, each run in a fresh process."""
    prompt = prompt_tokens(args.prompt_tokens)
    runs: dict[str, list[dict]] = {name: [] for name in files}
    per_token = {name: weight_bytes_per_token(path, SHAPES[shape]) for name, path in files.items()}
    for rnd in range(args.rounds):
        for name, path in files.items():
            warm_page_cache(path)
            probed = bandwidth(args.threads)  # the machine's, now: shared VMs drift
            args.bandwidths.append(probed)
            if name.startswith("rbe"):
                r = in_child("s.run_rbe", str(path), args.threads, prompt, args.new_tokens)
            else:
                r = in_child("d.run_llama_cpp", str(path), str(lib_dir), args.threads, prompt, args.new_tokens)
            r["share"] = per_token[name] * r["decode"] / (probed * 1e9)
            runs[name].append(r)
            print(f"{shape} round {rnd + 1} {name:<22} prefill {r['prefill']:6.1f} decode {r['decode']:5.1f} tok/s "
                  f"(BW share {r['share']:.0%} of {probed:.1f} GB/s) peak RSS {r['peak_rss_mb']:5.0f} MB "
                  f"load {r['load_s']:.2f} s", file=sys.stderr)
    out = {}
    for name, rs in runs.items():
        out[name] = {k: statistics.median(r[k] for r in rs) for k in ("prefill", "decode", "share", "peak_rss_mb",
                                                                       "load_s")}
        out[name]["file_mb"] = files[name].stat().st_size / 1e6
    return out


def markdown(results: dict, meta: dict, command: str) -> str:
    shapes = ", ".join(f"{name} {SHAPES[name]}" for name in results)
    lines = [MARK_BEGIN, "## Real size against llama.cpp (`benchmarks/scale.py`)", "",
             f"Shapes (hidden, layers, heads, kv heads, ffn, vocab[, experts, experts per token]): {shapes}.", "",
             f"Generated by `{command}` on {meta['cpu']}, {meta['threads']} threads, measured read bandwidth "
             f"{meta['bandwidth']:.1f} GB/s (median of one probe before every run, "
             f"{min(meta['bandwidths']):.1f}–{max(meta['bandwidths']):.1f}; {meta['threads']} threads reading 1 GiB, "
             "best of 5). Random weights of the real "
             f"shapes (speed and memory do not depend on the values); {meta['prompt']} prompt tokens, "
             f"{meta['new']} greedy tokens; every variant in a fresh process, {meta['rounds']} interleaved rounds, "
             "medians. Ratios to the llama.cpp peer in the same run (IQ4_XS for hadamard and trellis 4-bit, Q4_0 for int4). "
             "`BW share`: bytes of weights one decode step reads × tokens/s ÷ the bandwidth probed just before "
             "that run, median over the rounds; `load s`: "
             "opening the file until the model can run (page cache warm).", "",
             "| shape | variant | file MB | prefill tok/s | decode tok/s | prefill ratio | decode ratio | BW share "
             "| peak RSS MB | load s | conversion s | conversion peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape, res in results.items():
        for name, r in res["speed"].items():
            peer = res["speed"].get(PEERS.get(name, ""))
            ratio = [f"{r[k] / peer[k]:.2f}×" if peer else "" for k in ("prefill", "decode")]
            conv = res["conversions"][name]
            conv_txt = [f"{conv['seconds']:.0f}", f"{conv['peak_rss_mb']:.0f}"]
            lines.append(f"| {shape} | {name} | {r['file_mb']:.0f} | {r['prefill']:.1f} | {r['decode']:.2f} | "
                         f"{ratio[0]} | {ratio[1]} | {r['share']:.0%} | {r['peak_rss_mb']:.0f} | {r['load_s']:.2f} | {conv_txt[0]} | "
                         f"{conv_txt[1]} |")
    return "\n".join([*lines, "", MARK_END, ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["1b"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rbe-bench")
    p.add_argument("--reconvert", action="store_true", help="convert again even when the files are cached")
    p.add_argument("--llama-tools", type=Path, help="a bin folder holding llama.cpp's tools already built")
    p.add_argument("--only-gguf", type=Path, help="write the first shape's F16 GGUF to this path and stop")
    p.add_argument("--only-convert", action="store_true", help="make the files (and time the conversions), no runs")
    p.add_argument("--variants", nargs="+", choices=[*RBE_CODECS, *LLAMA_TYPES], default=None, metavar="NAME",
                   help="which of: " + ", ".join(map(repr, [*RBE_CODECS, *LLAMA_TYPES])) + " (default: all; "
                   "without AVX-512 VBMI all but the trellis one)")
    p.add_argument("--out", default="-", help="markdown file whose section to replace ('-': print only)")
    args = p.parse_args(argv)
    args.variants = args.variants or default_variants()
    if args.only_gguf:
        write_gguf(args.shape[0], args.only_gguf)
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    tools = args.llama_tools or ensure_llama_tools(args.cache)
    lib_dir = d.ensure_llama_cpp(args.cache, build=True)
    args.bandwidths = []
    results = {}
    for shape in args.shape:
        files, conversions = prepare(shape, args.cache, tools, args.reconvert, args.variants)
        if not args.only_convert:
            results[shape] = {"conversions": conversions, "speed": measure(shape, files, lib_dir, args)}
    if args.only_convert:
        return 0
    meta = {"cpu": d.cpu_name(), "threads": args.threads, "bandwidth": statistics.median(args.bandwidths),
            "bandwidths": args.bandwidths, "prompt": args.prompt_tokens, "new": args.new_tokens, "rounds": args.rounds}
    command = d.command_line("scale.py", argv)
    d.publish(markdown(results, meta, command), args.out, MARK_BEGIN, MARK_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
