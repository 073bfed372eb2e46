"""The ``rbe`` command line. Every command exits non-zero with a one-line message on bad input
(status 2) and on an internal error (status 1: ``rbe: internal error: ...``; ``-v`` shows the
traceback)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click

import rbe_core

from .errors import RBEError
from .hookspecs import KINDS
from .registry import codec_capabilities


def _fail(exc: Exception) -> None:
    click.echo(f"rbe: error: {exc}", err=True)
    sys.exit(2)


class _Commands(click.Group):
    """The command group: an exception no command turned into a message still ends in one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback unless -v
            if ctx.params.get("verbose"):
                raise
            click.echo(f"rbe: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=_Commands)
@click.version_option(rbe_core.__version__, prog_name="rbe")
@click.option("-v", "--verbose", is_flag=True,
              help="Log what rbe decides (e.g. the automatic backend) to stderr; tracebacks for internal errors.")
def main(verbose: bool) -> None:
    """Compress neural-network weights into block codes and run them."""
    _log_to_stderr(verbose)


_HANDLER_NAME = "rbe-cli"


def _keep_freed_memory() -> None:
    """Have glibc keep freed blocks of up to 1 GiB in the process instead of unmapping them: a
    calibrated conversion frees and re-allocates the same activations on every forward pass (the 1B
    shape spent 908 of 3,600 CPU-seconds in the kernel on 63 M page faults). Two heaps at most: each
    thread pool's threads would otherwise get heaps of their own, each keeping its freed blocks (the
    1B shape's peak RSS: 11.5 GB before, 17.3 GB with unbounded heaps). No-op without glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_arena_max, 2)
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, (1 << 31) - 1)


def _log_to_stderr(verbose: bool) -> None:
    """Route the ``rbe`` logger's INFO messages to stderr when ``verbose`` (once per process)."""
    logger = logging.getLogger("rbe")
    for h in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(h)
    if verbose:
        handler = logging.StreamHandler(sys.stderr)  # read now: the stream of this invocation
        handler.set_name(_HANDLER_NAME)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def backend_option(help_text: str = "Compute backend (default: $RBE_BACKEND or the best available, logged with -v)."):
    """The ``--backend NAME`` option shared by every command that computes."""
    return click.option("--backend", default=None, metavar="NAME", help=help_text)


def _check_backend(name: str | None) -> str:
    """Resolve the backend now (by name, ``$RBE_BACKEND`` or the best available), so an unknown or
    unavailable one fails with its reason before any work; returns the name."""
    try:
        return rbe_core.get_backend(name).name
    except RBEError as exc:
        _fail(exc)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List codecs, geometries, backends, derivative engines and quantizers, with their distributions."""
    reg = rbe_core.registry()
    backends = {b["name"]: b for b in rbe_core.list_backends()}
    out: dict = {}
    for kind in KINDS:
        rows = []
        for key, entry in sorted(reg.entries[kind].items()):
            row = {"name": key, "plugin": entry.plugin, "dist": entry.dist, "available": True, "reason": ""}
            if kind == "backends":
                row.update({k: backends[key][k] for k in ("available", "reason", "features", "priority")})
            elif kind == "codecs":
                row.update(codec_capabilities(key))
            rows.append(row)
        out[kind] = rows
    out["failed"] = [vars_of(p) for p in reg.failures]
    out["disabled"] = [vars_of(p) for p in reg.disabled]
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for kind in KINDS:
        click.echo(f"{kind}:")
        for row in out[kind] or [{"name": "(none)", "dist": "", "available": True, "reason": ""}]:
            state = "" if row["available"] else f"  [unavailable: {row['reason']}]"
            feats = f"  features: {', '.join(row['features'])}" if row.get("features") else ""
            click.echo(f"  {row['name']:<16} {row['dist']}{state}{feats}{_capabilities(row)}")
    for label in ("failed", "disabled"):
        for p in out[label]:
            click.echo(f"{label}: {p['plugin']} ({p['dist']}): {p['error']}")


def _capabilities(row: dict) -> str:
    """``  native: cffi, torch; generic: numpy; trains; calibrates`` for a codec row."""
    if "paths" not in row:
        return ""
    by_path: dict[str, list[str]] = {}
    for backend, path in row["paths"].items():
        by_path.setdefault(path, []).append(backend)
    parts = [f"{path}: {', '.join(names)}" for path, names in sorted(by_path.items())]
    parts += [flag for flag in ("trains", "calibrates") if row[flag]]
    return "  " + "; ".join(parts)


def vars_of(problem) -> dict:
    return {"plugin": problem.plugin, "dist": problem.dist, "error": problem.error}


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--reference", type=click.Path(exists=True),
              help="Source checkpoint (HF dir, .safetensors, .gguf): add each tensor's error against it.")
def inspect(path: str, as_json: bool, reference: str | None) -> None:
    """Describe the tensors of an .rbe file, verify their checksums and, with --reference, their error."""
    try:
        f = rbe_core.open(path)
    except (RBEError, OSError) as exc:
        _fail(exc)
    shapes, load = {}, None
    if reference is not None:
        from .models.sources import open_tensors

        try:
            shapes, load = open_tensors(reference)
        except _model_errors() as exc:
            _fail(exc)
    rows = []
    for name, h in f.headers.items():
        row = {"name": name, "codec": h["codec"], "plugin": h["plugin"], "shape": h["shape"], "dtype": h["dtype"],
               "source": h["source"]}
        try:
            enc = f[name]
        except RBEError as exc:
            row["status"] = f"{type(exc).__name__}: {exc}"
        else:
            row.update(status="ok", bytes=enc.nbytes, bits_per_weight=enc.bits_per_weight)
            if h["source"] in shapes:
                try:
                    row.update(rbe_core.report(enc, load(h["source"])))
                except ValueError as exc:
                    row["reference_error"] = str(exc)
        rows.append(row)
    ok = all(r["status"] == "ok" for r in rows)
    total_bytes = sum(r.get("bytes", 0) for r in rows)
    if as_json:
        click.echo(json.dumps({"path": path, "format": rbe_core.FORMAT_VERSION, "tensors": rows,
                               "total_bytes": total_bytes, "metadata_keys": sorted(f.metadata), "ok": ok}, indent=2))
    else:
        click.echo(f"{path}: {len(rows)} tensors, {total_bytes / 1e6:.3f} MB stored")
        for r in rows:
            bpw = f"{r['bits_per_weight']:7.3f} bpw" if "bits_per_weight" in r else "      ? bpw"
            err = f"  rel.RMSE {r['relative_rmse']:.4f}  SNR {r['snr_db']:5.1f} dB" if "relative_rmse" in r else ""
            click.echo(f"  {r['name']:<48} {r['codec']['id']:<10} {str(r['shape']):<16} {bpw}{err}  {r['status']}")
    if not ok:
        sys.exit(1)


def _model_errors():
    """The errors model commands turn into a one-line message and exit status 2."""
    from .models.spec import ModelError

    return (RBEError, ModelError, OSError, ValueError)


def refine_options(f):
    """The options ``rbe refine`` and ``rbe convert --refine`` share."""
    opts = [
        click.option("--data", "data", default=None,
                     help="Data spec: a file, a folder, builtin:stdlib|debian|teacher|broad, or several joined "
                          "with commas (default: builtin:broad for --refine, the built-in text for calibration)."),
        click.option("--refine-tokens", type=click.IntRange(2), default=8192, show_default=True,
                     help="Tokens of the data each block is refined on."),
        click.option("--refine-epochs", type=click.IntRange(1), default=2, show_default=True),
        click.option("--resume", is_flag=True, help="Continue after the last refined block of an interrupted run "
                                                    "(OUT.refine-ckpt)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="The .rbe file to write (with --hf: the directory to create).")
@click.option("--codec", default=None, help="Codec id or JSON config for every weight matrix (default int8).")
@click.option("--target-bpw", type=float, default=None,
              help="Pick codec settings per tensor so the average bits/weight <= X (with --codec: among its bit "
                   "settings, e.g. --codec trellis for the trellis-coded flagship; default: the flagship "
                   "hadamard's; encoders: trellis). Below 4 bits --codec trellis fits far better (SmolLM2 "
                   "at 3.25: a third less KL) but decodes ~5x slower on CPUs without AVX-512 VBMI.")
@click.option("--policy", type=click.Path(exists=True, dir_okay=False), help="JSON {tensor-name glob: codec}.")
@click.option("--jobs", type=click.IntRange(1, 64), default=None,
              help="Tensors encoded in parallel (default: the CPUs this process may use; each holds one tensor).")
@backend_option("Run the converted model once on this backend before writing (default: no check run).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibration text file for --target-bpw / calibrated codecs (default: a built-in text).")
@click.option("--calibration-tokens", type=click.IntRange(16), default=None,
              help="Tokens of the calibration text GPTQ sees (more: better Hessians, slower). "
                   "Default: 16384 for encoders, 4096 for causal LMs (trellis codes: up to 16384, "
                   "as the model's size allows).")
@click.option("--no-calibration", is_flag=True, help="Encode without calibration (streaming, round-to-nearest).")
@click.option("--no-smoothing", is_flag=True,
              help="Calibrate without first folding per-channel scales from norms into the Linears that read them.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Encode on a Ray cluster: ADDRESS (e.g. ray://head:10001), 'auto' (the one `ray start` runs "
                   "here), or nothing (a local one); --jobs defaults to its CPUs. Needs rbe[ray].")
@click.option("--refine", "do_refine", is_flag=True,
              help="Then refine it (rbe refine): block-wise reconstruction against the source, codes frozen.")
@refine_options
@click.option("--hf", "as_hf", is_flag=True,
              help="Write a transformers folder with rbe codes (from_pretrained loads it after `import rbe_core.hf`); "
                   "any architecture transformers builds. Needs rbe[hf].")
def convert(src, out, codec, target_bpw, policy, jobs, backend, quiet, calibration, calibration_tokens, no_calibration,
            no_smoothing, ray_address, do_refine, data, refine_tokens, refine_epochs, resume, as_hf):
    """Convert a HF directory, .safetensors or .gguf model SRC into a self-contained .rbe file (or, with --hf,
    a transformers folder)."""
    if backend is not None:
        _check_backend(backend)
    if codec is not None and codec.lstrip().startswith("{"):
        try:
            codec = json.loads(codec)
        except json.JSONDecodeError as exc:
            _fail(ValueError(f"--codec is not valid JSON: {exc}"))
    if data is not None and calibration is not None:
        _fail(ValueError("give --data or --calibration, not both"))
    if as_hf:
        jobs = jobs or 1
        if do_refine or data is not None:
            _fail(ValueError("--refine and --data cannot be combined with --hf (use --calibration FILE)"))
        _convert_hf(src, out, codec, target_bpw, policy, jobs, ray_address, quiet,
                    False if no_calibration else calibration, calibration_tokens, not no_smoothing)
        return
    import tempfile

    if not no_calibration:
        _keep_freed_memory()
    with tempfile.TemporaryDirectory(prefix=".rbe-convert-", dir=Path(out).resolve().parent) as work:
        try:
            if data is not None and not no_calibration:
                from .compression.data import load as load_data

                calibration = Path(work) / "calibration.txt"
                calibration.write_text(load_data(data).train, encoding="utf-8")
            # refining: the unrefined file waits beside OUT, so an interrupted refinement resumes without re-converting
            target = Path(out).with_name(Path(out).name + ".unrefined.rbe") if do_refine else out
            t0 = time.perf_counter()
            if do_refine and resume and target.is_file():
                path = target
            else:
                local_cpus = 1 if ray_address else len(os.sched_getaffinity(0))  # Ray: the cluster's CPUs
                path = rbe_core.compress_model(src, target, codec=codec, target_bpw=target_bpw, policy=policy,
                                               jobs=jobs or local_cpus, progress=not quiet, verify_backend=backend,
                                               calibration=False if no_calibration else calibration,
                                               calibration_tokens=calibration_tokens, cluster=ray_address,
                                               smoothing=not no_smoothing)
            if do_refine:
                from .compression.refine import refine as run_refine

                click.echo(f"converted in {time.perf_counter() - t0:.0f} s; refining", err=True)
                res = run_refine(path, src, out, data=data or "builtin:broad", tokens=refine_tokens,
                                 epochs=refine_epochs, resume=resume, progress=not quiet)
                click.echo(f"refined: block output error {res['mean_before']:.4g} -> {res['mean_after']:.4g} "
                           f"(mean over {len(res['blocks'])} blocks, held-out), {res['seconds']:.0f} s", err=True)
                Path(target).unlink()
                path = Path(out)
        except _model_errors() as exc:
            _fail(exc)
    f = rbe_core.open(path)
    enc = [f[n] for n in f]
    comp = [e for e in enc if e.codec.codec_id != "raw"]
    bpw = 8.0 * sum(e.nbytes for e in comp) / max(1, sum(e.numel for e in comp))
    click.echo(f"wrote {path}: {len(enc)} tensors, {path.stat().st_size / 1e6:.2f} MB, "
               f"{bpw:.3f} bits/weight over {len(comp)} compressed tensors", err=True)


def _convert_hf(src, out, codec, target_bpw, policy, jobs, ray_address, quiet, calibration, calibration_tokens,
                smoothing):
    """``rbe convert --hf``: compress with ``rbe_core.hf`` and save a transformers folder."""
    unsupported = [o for o, v in (("--policy", policy), ("--jobs", jobs > 1), ("--ray", ray_address)) if v]
    if unsupported:
        _fail(ValueError(f"{', '.join(unsupported)} cannot be combined with --hf"))
    try:
        from .hf.convert import convert_to_hf
    except ImportError as exc:
        _fail(ValueError(f"--hf needs transformers (pip install 'rbe[hf]'): {exc}"))
    try:
        path = convert_to_hf(src, out, codec, target_bpw, calibration=calibration,
                             calibration_tokens=calibration_tokens, smoothing=smoothing, progress=not quiet)
    except _model_errors() as exc:
        _fail(exc)
    f = rbe_core.open(path)
    comp = [f[n] for n, h in f.headers.items() if h["codec"]["id"] != "raw"]
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    bpw = 8.0 * sum(e.payload_nbytes for e in comp) / max(1, sum(e.numel for e in comp))
    click.echo(f"wrote {path}: transformers folder, {size / 1e6:.2f} MB of safetensors, "
               f"{bpw:.3f} bits/weight over {len(comp)} quantized layers", err=True)


def engine_option():
    """The ``--engine`` option of the commands that generate."""
    return click.option("--engine", type=click.Choice(["auto", "native", "torch"]), default="auto", show_default=True,
                        help="Run generation in the backend's native engine (auto: when the model lowers to it) "
                             "or in the torch modules.")


def _load(path: str, backend: str | None, engine: str = "auto"):
    """The model in ``path`` for inference (``load_inference``: no torch on a native engine)."""
    from .models.loading import load_inference

    backend = _check_backend(backend)
    try:
        return load_inference(path, backend, engine=engine)
    except _model_errors() as exc:
        _fail(exc)


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed (reproducible output).")
@backend_option()
@engine_option()
def infer(path, prompt, max_tokens, temperature, top_k, top_p, seed, backend, engine):
    """Continue PROMPT with the language model in PATH, streaming tokens; stops at EOS or the context end."""
    from .models.generation import TextGeneration
    from .models.spec import ModelError

    model = _load(path, backend, engine)
    if not isinstance(model, TextGeneration):
        _fail(ModelError(f"{model.spec.name} models do not generate text; use rbe embed"))
    try:
        prompt_tokens = len(model.encode_prompt(prompt))
        room = model.max_new_tokens(prompt_tokens, max_tokens)
        if room < max_tokens:
            click.echo(f"rbe: note: --max-tokens {max_tokens} clamped to {room}: the prompt is {prompt_tokens} tokens "
                       f"of the model's {model.context_length}-token context", err=True)
        for piece in model.stream(prompt, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed):
            click.echo(piece, nl=False)
    except _model_errors() as exc:
        _fail(exc)
    click.echo()


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.argument("sentences", nargs=-1, required=True)
@backend_option()
def embed(path, sentences, backend):
    """Print sentence embeddings of SENTENCES as JSON ({"model", "dim", "embeddings"})."""
    model = _load(path, backend)
    try:
        vectors = model.embed(list(sentences))
    except _model_errors() as exc:
        _fail(exc)
    click.echo(json.dumps({"model": path, "dim": int(vectors.shape[1]), "embeddings": vectors.tolist()}))


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Directory to create.")
def export(path, out):
    """Write the model in PATH as a HF directory (decoded fp32 safetensors, config.json, tokenizer.json)."""
    from .compression.convert import export_hf

    try:
        click.echo(f"wrote {export_hf(path, out)}", err=True)
    except _model_errors() as exc:
        _fail(exc)


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--prompt-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--new-tokens", type=click.IntRange(1), default=32, show_default=True)
@backend_option("Compute backend for the compressed model (default: $RBE_BACKEND or the best available).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch intra-op and cffi threads (default: each one's own choice).")
@engine_option()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def bench(path, prompt_tokens, new_tokens, backend, threads, engine, as_json):
    """Prefill/decode tokens per second and peak memory: the .rbe model vs the same model dense fp32."""
    from .models.bench import bench as run_bench

    backend = _check_backend(backend)
    _load(path, backend, engine)  # fail fast with a clear message before spawning workers
    try:
        rows = run_bench(path, backend, prompt_tokens, new_tokens, threads, engine)
    except _model_errors() as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        decode = f"decode {r['decode_tok_s']:8.1f} tok/s" if "decode_tok_s" in r else "decode      n/a"
        split = r.get("decode_ms_per_token")
        split_txt = ("  per token: " + ", ".join(f"{k} {v:.2f} ms" for k, v in split.items())) if split else ""
        name = f"{r['variant']} {r.get('backend', 'torch')}/{r.get('engine', 'torch')}"
        click.echo(f"{name:<18} prefill {r['prefill_tok_s']:8.1f} tok/s ({r['prompt_tokens']} tokens)  {decode}  "
                   f"peak RSS {r['peak_rss_mb']:7.1f} MB (after imports {r['base_rss_mb']:.1f} MB)  load {r['load_s']:.2f}s  "
                   f"threads {r['threads']}  load {r['load_avg']:.2f}{split_txt}")


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="UTF-8 text to train on.")
@click.option("--steps", required=True, type=click.IntRange(1), help="Optimizer steps (in total, resumed ones included).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="The .rbe file to write.")
@click.option("--teacher", default=None, type=click.Path(exists=True), help="Uncompressed model to distil from "
              "(HF dir, .safetensors, .gguf or .rbe); without it: LM loss (encoders: contrastive).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True)
@click.option("--batch-tokens", type=click.IntRange(2), default=1024, show_default=True, help="Tokens per step.")
@click.option("--seq-len", type=click.IntRange(2), default=128, show_default=True)
@click.option("--engine", default="autograd", show_default=True, help="Derivative engine for the codec parameters.")
@click.option("--quantizer", default=None, help="Train shadow weights through this quantizer instead (ste, lsq, ...).")
@click.option("--checkpoint-every", type=click.IntRange(0), default=0, show_default=True, help="0 = no checkpoints.")
@click.option("--checkpoint-dir", default=None, type=click.Path(file_okay=False), help="Default: OUT.ckpt")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True)
@backend_option()
@click.option("--quiet", is_flag=True, help="No progress bar.")
def finetune(path, data, steps, out, teacher, lr, batch_tokens, seq_len, engine, quantizer, checkpoint_every,
             checkpoint_dir, resume, seed, backend, quiet):
    """Train the codec parameters of the model in PATH on the text in --data; write the result to OUT."""
    from .training.finetuning import finetune as run_finetune

    backend = _check_backend(backend)
    try:
        res = run_finetune(path, data, out, steps=steps, teacher=teacher, lr=lr, batch_tokens=batch_tokens,
                           seq_len=seq_len, engine=engine, quantizer=quantizer, checkpoint_every=checkpoint_every,
                           checkpoint_dir=checkpoint_dir, resume=resume, seed=seed, backend=backend,
                           progress=not quiet)
    except _model_errors() as exc:
        _fail(exc)
    last = f", final loss {res.losses[-1]:.4f}" if res.losses else ""
    click.echo(f"wrote {res.path}: steps {res.start_step}..{res.steps}{last}", err=True)


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--source", required=True, type=click.Path(exists=True),
              help="The float model PATH was converted from (HF dir, .safetensors, .gguf).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="The .rbe file to write.")
@refine_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def refine(path, source, out, data, refine_tokens, refine_epochs, resume, quiet):
    """Refine the compressed model in PATH after rounding: block by block, its continuous parameters
    (group steps, norms; codes frozen) are tuned so each block reproduces the float model's block."""
    from .compression.refine import refine as run_refine

    try:
        res = run_refine(path, source, out, data=data or "builtin:broad", tokens=refine_tokens, epochs=refine_epochs,
                         resume=resume, progress=not quiet)
    except _model_errors() as exc:
        _fail(exc)
    click.echo(f"wrote {out}: block output error {res['mean_before']:.4g} -> {res['mean_after']:.4g} "
               f"(mean over {len(res['blocks'])} blocks, held-out), {res['seconds']:.0f} s", err=True)


@main.command("eval")
@click.argument("path", type=click.Path(exists=True))
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Evaluation text (use one the model was not calibrated on).")
@click.option("--reference", type=click.Path(exists=True), default=None,
              help="Reference model (HF dir, .safetensors, .gguf or .rbe): adds KL/top-1 or embedding cosines.")
@click.option("--window", type=click.IntRange(2), default=512, show_default=True, help="Causal LMs: tokens per window.")
@click.option("--max-tokens", type=click.IntRange(1), default=None, help="Causal LMs: first N tokens; encoders: first N sentences.")
@click.option("--backend", default=None, help="Compute backend for the compressed model.")
@click.option("--dense", is_flag=True, help="Decode the weights once instead of fused kernels (faster, same numbers).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_(path, text_file, reference, window, max_tokens, backend, dense, as_json):
    """Perplexity (+ KL and top-1 vs --reference) of a causal LM, or embedding cosines of an encoder.

    PATH: an .rbe file, a transformers folder with rbe codes, or a checkpoint rbe reads (a GGUF of any
    llama.cpp type, for side-by-side figures); bits per weight are reported over the Linear layers
    (linear_bpw) and over every stored byte (file_bpw)."""
    from .compression.evaluate import evaluate

    try:
        with open(text_file, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        res = evaluate(path, text, reference, window=window, max_tokens=max_tokens, backend=backend, dense=dense)
    except _model_errors() as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    for key, value in res.items():
        click.echo(f"{key:<16} {value:.6g}" if isinstance(value, float) else f"{key:<16} {value}")



def _draining_server_class():
    import contextlib
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """SIGINT/SIGTERM start a graceful shutdown (running requests finish), then exit 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return DrainingServer


@main.command()
@click.argument("models", nargs=-1, type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1 routes.")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Read the API key from this file (first line).")
@backend_option()
@click.option("--max-queue", type=click.IntRange(1), default=64, show_default=True,
              help="Requests waiting per model; more are answered 503 at once.")
@click.option("--slots", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Sequences generated at once per model (the native engine advances them in one batched "
                   "pass a round; each holds a KV cache slot).")
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds a request may take (and how long shutdown waits for running ones).")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allow browser requests from this origin.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also answer requests whose Host is NAME (default: the bound address; loopback names for loopback).")
@click.option("--max-body", type=click.IntRange(1024), default=8 << 20, show_default=True,
              help="Largest request body in bytes (413 beyond).")
@click.option("--models-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Let POST /v1/models/load load files inside this directory (without it, loading over HTTP is refused).")
@click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds a client has to send a request's headers (after connecting or after the last answer); "
                   "then the connection is closed.")
@click.option("--body-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds a request body may take to arrive (408 beyond).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Serve as a Ray Serve application (a cluster ADDRESS, 'auto', or nothing: a local one). Needs rbe[ray].")
@click.option("--replicas", type=click.IntRange(1, 256), default=1, show_default=True,
              help="With --ray: copies of the server behind Ray Serve's proxy.")
def serve(models, host, port, api_key, api_key_file, backend, max_queue, slots, timeout, cors_origins, allowed_hosts,
          max_body, models_dir, header_timeout, body_timeout, ray_address, replicas):
    """Serve .rbe MODELS over an OpenAI-compatible HTTP API, with a chat page at /.

    Models load in the background (GET /health answers 503 until they are ready); with
    --models-dir, more can be added from that directory with POST /v1/models/load. SIGTERM or
    Ctrl-C finishes running requests, then exits. (With --ray, Ray Serve's proxy reads the
    requests: --header-timeout does not apply.)
    """
    try:
        import uvicorn

        from .serve.app import Settings, create_app, head_deadline_protocol
    except ImportError as exc:
        _fail(RBEError(f"rbe serve needs the 'serve' extra: pip install 'rbe[serve]' ({exc})"))
    if api_key_file is not None:
        lines = Path(api_key_file).read_text().splitlines()
        api_key = lines[0].strip() if lines else ""
        if not api_key:
            _fail(RBEError(f"{api_key_file}: the first line holds no key"))
    if backend is not None:
        _check_backend(backend)
    settings = Settings(models=tuple(str(Path(m).resolve()) for m in models), backend=backend, api_key=api_key,
                        max_queue=max_queue, slots=slots, timeout=timeout, cors_origins=tuple(cors_origins),
                        max_body=max_body, host=host, allowed_hosts=tuple(allowed_hosts),
                        models_dir=str(Path(models_dir).resolve()) if models_dir else None, body_timeout=body_timeout)
    if ray_address is not None:
        from .serve.ray_serve import serve_replicas

        click.echo(f"rbe serve: http://{host}:{port}/ on Ray, {replicas} replica(s)", err=True)
        try:
            serve_replicas(settings, ray_address, replicas, host, port)
        except _model_errors() as exc:
            _fail(exc)
        return
    if replicas != 1:
        _fail(click.UsageError("--replicas needs --ray"))
    config = uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=int(timeout), access_log=False,
                            http=head_deadline_protocol(header_timeout))
    server = _draining_server_class()(config)
    click.echo(f"rbe serve: http://{host}:{port}/ ({len(models)} model(s) loading)", err=True)
    try:
        server.run()
    except OSError as exc:
        _fail(exc)


if __name__ == "__main__":
    main()
