"""Smoothing folded from norms into the Linears that read them: the float model unchanged, the
activations' and weights' channel ranges evened out, norms read by anything else left alone."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from _model_helpers import tiny_bert, tiny_llama  # noqa: E402

import rbe_core  # noqa: E402
from rbe_core.compression.calibration import batches, source_model  # noqa: E402
from rbe_core.compression.smoothing import _norm_readers, smooth  # noqa: E402
from rbe_core.models.sources import open_source  # noqa: E402

torch = pytest.importorskip("torch")
TEXT = "Compressed weights are decoded inside the matrix multiply. The quick brown fox jumps over the lazy dog. " * 12


def _model(kind, tmp_path):
    ref = tiny_llama(num_hidden_layers=2) if kind == "llama" else tiny_bert()
    with torch.no_grad():  # channels of very different ranges, as in trained models
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight") or name.endswith("LayerNorm.weight"):
                p.copy_(torch.exp(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)))))
    ref.save_pretrained(tmp_path / kind)
    model, factory = source_model(open_source(tmp_path / kind))
    linears = {n: factory.linears[n] for n in factory.linears if n not in factory.embeddings}
    return model, factory, linears, batches(model, TEXT, max_tokens=128, window=32, batch=2)


def _out(model, data):
    out = model(*data[0][0])
    return (out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)).float()


def test_folds_keep_the_float_model_and_even_out_the_channels(tmp_path):
    model, _factory, linears, data = _model("llama", tmp_path)
    with torch.no_grad():
        before = _out(model, data)
    changed = smooth(model, linears, data)
    assert len(changed) == 5  # each layer's attention norm and MLP norm, the final norm (an untied head)
    with torch.no_grad():
        after = _out(model, data)
    assert float((after - before).abs().max() / before.abs().max()) < 1e-4
    readers, amax = _norm_readers(model, linears, data)
    assert len(readers) == 5
    for norm, layers in readers.items():  # alpha 0.5: amax|x_j| / amax|W[:, j]| the same for every j
        w = torch.stack([layer.weight.abs().amax(0) for layer in layers]).amax(0)
        ratio = amax[norm] / w
        assert float(ratio.std() / ratio.mean()) < 1e-3


def test_norms_read_by_more_than_linears_are_left_alone(tmp_path):
    """BERT's norms come after the residual sum: their output is the next residual too."""
    model, _factory, linears, data = _model("bert", tmp_path)
    with torch.no_grad():
        before = _out(model, data)
    assert smooth(model, linears, data) == []
    with torch.no_grad():
        assert torch.equal(_out(model, data), before)


def test_a_smoothed_conversion_stores_its_folded_norms(tmp_path):
    """Folded at 4.5 bits a weight; not with ``smoothing=False``, nor under a budget below
    ``SMOOTHING_MIN_BITS``, nor for a fixed codec of fewer bits."""
    tiny_llama(num_hidden_layers=2).save_pretrained(tmp_path / "hf")
    runs = {"on": {"target_bpw": 4.5}, "off": {"target_bpw": 4.5, "smoothing": False},
            "3.5": {"target_bpw": 3.5}, "2-bit": {"codec": {"id": "hadamard", "bits": 2}}}
    files = {k: rbe_core.open(rbe_core.compress_model(tmp_path / "hf", tmp_path / f"{k}.rbe", progress=False,
                                                     calibration_tokens=256, **kw)) for k, kw in runs.items()}
    source = open_source(tmp_path / "hf")
    norms = [n for n in files["on"] if n.endswith("layernorm.weight")]
    assert len(norms) == 4
    for n in norms:
        assert not np.allclose(files["on"][n].decode(), source.load(n))
        for k in ("off", "3.5", "2-bit"):
            assert np.array_equal(files[k][n].decode(), source.load(n)), k
