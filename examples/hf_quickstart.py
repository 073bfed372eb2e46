"""rbe inside transformers, end to end, on an architecture rbe has no code for (Qwen2), offline.

    pip install 'rbe[hf]'            # rbe + transformers + peft
    python examples/hf_quickstart.py [--model HF_DIR_OR_ID] [--codec '{"id": "hadamard", "bits": 4, "grid": "normal"}']

Without ``--model`` a small random Qwen2 is built from a config (no download). Steps: compress in
place, save, reload in a fresh interpreter and generate, train a LoRA for a few steps, merge it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch
import transformers
from peft import LoraConfig, get_peft_model

import rbe_core.hf  # registers quant_method "rbe" (and rbe's LoRA layer with PEFT)
from rbe_core.hf import footprint, quantize

RELOAD = """
import json, sys, torch, transformers, rbe_core.hf
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor(json.loads(sys.argv[2]))
print(json.dumps(model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0].tolist()))
"""


def build(model_id: str | None):
    if model_id:
        return transformers.AutoModelForCausalLM.from_pretrained(model_id, dtype="float32").eval()
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(config).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF folder or hub id (default: a random tiny Qwen2)")
    ap.add_argument("--codec", default='{"id": "hadamard", "bits": 4, "grid": "normal"}')
    args = ap.parse_args()
    codec = json.loads(args.codec) if args.codec.lstrip().startswith("{") else args.codec

    model = build(args.model)
    dense_mb = model.get_memory_footprint() / 1e6
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    quantize(model, codec)  # 1. compress in place
    fp = footprint(model)
    print(f"1. quantized {fp['layers']} layers in {time.perf_counter() - t0:.1f} s: {fp['bits_per_weight']:.2f} bits/weight, "
          f"model {dense_mb:.1f} MB -> {model.get_memory_footprint() / 1e6:.1f} MB")
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0].tolist()

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)  # 2. save: codes in the safetensors, codec map in config.json
        out = subprocess.run([sys.executable, "-c", RELOAD, folder, json.dumps(ids.tolist())],
                             capture_output=True, text=True, check=True)
        reloaded = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"2./3. saved, reloaded in a fresh process: greedy generate identical = {reloaded == expected}")

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    batch = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(5):  # 4. train a LoRA: codes frozen, gradients on the adapters only
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
    print(f"4. LoRA ({sum(p.numel() for p in peft_model.parameters() if p.requires_grad):,} trainable) losses {losses}")
    layers = [m for m in peft_model.modules() if type(m).__name__ == "RbeLoraLinear"]
    merged = peft_model.merge_and_unload()  # 5. merge: decode + B·A·scale, re-encoded with the same codec
    errors = [e for m in layers for e in m.merge_errors.values()]
    print(f"5. merged into {len(errors)} layers, re-encoding error (relative Frobenius) mean {sum(errors) / len(errors):.4f}; "
          f"still rbe layers: {len(rbe_core.hf.quantized_modules(merged))}")


if __name__ == "__main__":
    main()
