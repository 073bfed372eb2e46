"""``rbe eval``: quality of a compressed model on a text, alone or against a reference model.

Causal LMs: perplexity over non-overlapping windows of the text (every token after a window's
first is predicted); with a reference, the mean per-token KL(reference ‖ model) and the top-1
(next-token argmax) agreement. Encoders: the text's sentences are embedded; with a reference, the
mean and minimum cosine between the model's and the reference's embeddings.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models.common import CausalLM
from ..models.loading import load_model
from ..models.spec import ModelError
from .calibration import sentences


def reference_model(src: str | os.PathLike):
    """rbe's dense fp32 model of a source checkpoint (HF directory, .safetensors, .gguf) or .rbe file."""
    if str(src).endswith(".rbe"):
        return load_model(src, dense=True)
    from ..models.sources import open_source
    from .calibration import source_model

    return source_model(open_source(src))[0]


#: A tensor inside a transformer block (GGUF ``blk.N.``, HF ``layers.N.`` / ``layer.N.`` / ``h.N.``).
_IN_BLOCK = re.compile(r"(^|\.)(blk|layers|layer|h)\.\d+\.")


def _is_source(path: str | os.PathLike) -> bool:
    """A checkpoint rbe reads as a float model (GGUF, safetensors, plain HF folder), not rbe codes."""
    p = Path(path)
    if not p.is_dir():
        return p.suffix in (".gguf", ".safetensors")
    from ..hf.folder import quantization_config

    return quantization_config(p) is None


def stored_bits(path: str | os.PathLike) -> dict[str, Any]:
    """Bits per weight counted two ways: ``linear_bpw`` over the 2-D tensors inside transformer
    blocks (the Linear layers: embedding and head excluded), ``file_bpw`` every stored byte of the
    file(s) (headers, tokenizer and metadata included) over every weight. For .rbe files, rbe HF
    folders and GGUF files (any llama.cpp type); ``bits_per_weight`` over every compressed tensor
    (embeddings included, raw tensors not) for rbe's own files."""
    p = Path(path)
    if p.suffix == ".gguf":
        import gguf

        tensors = [(t.name, len(t.shape), int(t.n_bytes), int(t.n_elements)) for t in gguf.GGUFReader(str(p)).tensors]
        files, compressed = [p], None
    else:
        from ..files import open as open_rbe

        f = open_rbe(p)
        encs = {n: f[n] for n in f}
        tensors = [(n, len(e.shape), e.nbytes, e.numel) for n, e in encs.items()]
        comp = [e for n, e in encs.items() if f.headers[n]["codec"]["id"] != "raw"]
        compressed = 8.0 * sum(e.nbytes for e in comp) / max(1, sum(e.numel for e in comp)) if comp else None
        files = sorted(p.glob("*.safetensors")) + [p / "config.json"] if p.is_dir() else [p]
    linear = [(b, n) for name, dims, b, n in tensors if dims == 2 and _IN_BLOCK.search(name)]
    weights = sum(n for _name, _d, _b, n in tensors)
    out = {"linear_bpw": 8.0 * sum(b for b, _n in linear) / max(1, sum(n for _b, n in linear)),
           "file_bpw": 8.0 * sum(f.stat().st_size for f in files) / max(1, weights)}
    if compressed is not None:
        out["bits_per_weight"] = compressed
    return out


@torch.no_grad()
def evaluate(model_path: str | os.PathLike, text: str, reference: str | os.PathLike | None = None, *,
             window: int = 512, max_tokens: int | None = None, backend: str | None = None,
             dense: bool = False) -> dict[str, Any]:
    """Quality figures (a JSON-able dict) of the model at ``model_path`` on ``text``: an .rbe file, a
    transformers folder with rbe codes, or a float/quantized checkpoint rbe reads (a GGUF of any
    llama.cpp type — dequantized with the ``gguf`` package —, safetensors, a HF folder).

    ``dense`` decodes every weight once (faster; numerically what the fused kernels compute).
    """
    t0 = time.perf_counter()
    if _is_source(model_path):
        model = reference_model(model_path)
    else:
        model = load_model(model_path, None if dense else backend, dense=dense)
    ref = reference_model(reference) if reference is not None else None
    out: dict[str, Any] = {"model": str(model_path), "reference": None if reference is None else str(reference),
                           "bits_per_weight": None}
    if Path(model_path).suffix != ".safetensors" and not (Path(model_path).is_dir() and _is_source(model_path)):
        out.update(stored_bits(model_path))
    if isinstance(model, CausalLM):
        out.update(_causal(model, ref, text, window, max_tokens))
    else:
        out.update(_encoder(model, ref, text, max_tokens))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _causal(model, ref, text: str, window: int, max_tokens: int | None) -> dict[str, Any]:
    ids = model._require_tokenizer().encode(text).ids[:max_tokens]
    window = max(2, min(window, model.context_length))
    rows = [ids[i : i + window] for i in range(0, len(ids), window)]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ModelError("the evaluation text has fewer than 2 tokens")
    nll = kl = agree = 0.0
    count = 0
    for r in rows:
        x = torch.tensor([r])
        logp = F.log_softmax(model(x)[0][0, :-1].double(), -1)
        target = x[0, 1:]
        nll -= float(logp.gather(1, target[:, None]).sum())
        count += len(r) - 1
        if ref is not None:
            ref_logp = F.log_softmax(ref(x)[0][0, :-1].double(), -1)
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            agree += float((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    res: dict[str, Any] = {"kind": "causal-lm", "tokens": count, "windows": len(rows), "window": window,
                           "perplexity": math.exp(nll / count)}
    if ref is not None:
        res.update(kl=kl / count, top1_agreement=agree / count)
    return res


def _encoder(model, ref, text: str, max_sentences: int | None) -> dict[str, Any]:
    sents = sentences(text)[:max_sentences]
    if not sents:
        raise ModelError("the evaluation text has no sentences of 4 words or more")
    res: dict[str, Any] = {"kind": "encoder", "sentences": len(sents)}
    if ref is None:
        return res
    cos = torch.cat([F.cosine_similarity(model.embed(sents[i : i + 32]), ref.embed(sents[i : i + 32]), dim=-1)
                     for i in range(0, len(sents), 32)])
    res.update(mean_cosine=float(cos.mean()), min_cosine=float(cos.min()))
    return res
