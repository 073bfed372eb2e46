"""Training in the compressed domain: trainable layers, a tiny fit, finalize -> save -> open."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import rbe_core
from rbe_core.layers import RBELinear
from rbe_core.training.trainable import (
    QATLinear,
    TrainableRBELinear,
    finalize,
    prepare_for_training,
)

SETUPS = [
    ({"id": "int8"}, {}),
    ({"id": "int4", "group_size": 16}, {}),
    ({"id": "trellis", "bits": 3, "group_size": 8}, {}),
    ({"id": "packed128", "block": 8}, {"engine": "cyclic"}),
    ({"id": "cyclic16", "group_size": 16}, {"engine": "cyclic"}),
    ({"id": "int8"}, {"quantizer": "ste"}),
    ({"id": "int4", "group_size": 16}, {"quantizer": "lsq"}),
    ({"id": "int4", "group_size": 16}, {"quantizer": "codebook", "bits": 4}),
]


def _ids(setup):
    cfg, kw = setup
    return f"{cfg['id']}-{kw.get('quantizer') or kw.get('engine', 'autograd')}"


def _fit(params, loss_fn, lr: float, steps: int = 15) -> list[float]:
    """``steps`` Adam steps on ``loss_fn()``; the loss before each step."""
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _model(cfg, backend, transposed_last=False):
    gen = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(32, 24, generator=gen) * 0.3, torch.randn(8, 32, generator=gen) * 0.3
    codec = rbe_core.get_codec(cfg)
    last = RBELinear.from_encoded(codec.encode(w2.T.contiguous() if transposed_last else w2), torch.zeros(8),
                                  backend, transposed=transposed_last)
    return nn.Sequential(RBELinear.from_encoded(codec.encode(w1), torch.zeros(32), backend), nn.Tanh(), last)


@pytest.mark.parametrize("setup", SETUPS, ids=_ids)
def test_training_reduces_loss_and_finalizes(setup, backend, tmp_path):
    cfg, kw = setup
    model = _model(cfg, backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 24, generator=gen)
    with torch.no_grad():
        target = model(x) * 1.3 + 0.1  # a nearby function the codes must move to reach
    names = prepare_for_training(model, **kw)
    assert names == ["0", "2"]
    layer_type = QATLinear if "quantizer" in kw else TrainableRBELinear
    assert all(isinstance(model[int(n)], layer_type) for n in names)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = _fit(trainable, lambda: ((model(x) - target) ** 2).mean(), lr=2e-3)
    with torch.no_grad():
        trained_out = model(x)
    assert np.mean(losses[-3:]) < 0.8 * losses[0]
    snapped = {n: model[int(n)].quantized_weight().detach() for n in names if isinstance(model[int(n)], QATLinear)}
    encoded = finalize(model)
    assert set(encoded) == {"0", "2"} and all(isinstance(m, RBELinear) for m in (model[0], model[2]))
    with torch.no_grad():
        final_out = model(x)
    if kw.get("quantizer") == "codebook":  # no codec stores a codebook: the snapped weight is re-encoded
        for n, w in snapped.items():
            np.testing.assert_array_equal(encoded[n].decode(), rbe_core.get_codec(cfg).encode(w).decode())
    else:  # engines and on-grid quantizers write exactly what the forward trained on
        torch.testing.assert_close(final_out, trained_out, rtol=1e-5, atol=1e-5)
    path = rbe_core.save(tmp_path / "trained.rbe", encoded)
    with rbe_core.open(path) as f:
        for name, enc in encoded.items():
            assert f[name].codec.get_config() == enc.codec.get_config()
            np.testing.assert_array_equal(f[name].decode(), enc.decode())


@pytest.mark.parametrize("engine", ["autograd", "cyclic"])
def test_trainable_layer_gradients_match_dense_reference(engine, backend):
    model = _model({"id": "packed128", "block": 8}, backend, transposed_last=True)
    prepare_for_training(model, engine=engine)
    layer = model[2]
    assert layer.transposed
    x = torch.randn(5, 32, requires_grad=True)
    out = layer(x)
    params = {f: p.detach().double().clone().requires_grad_() for f, p in zip(layer.fields, layer.shadow, strict=True)}
    w = layer.form.decode(layer.encoded, params)
    x64 = x.detach().double().requires_grad_()
    ref = x64 @ w + layer.bias.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    up = torch.randn_like(out)
    (out * up).sum().backward()
    (ref * up.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    for f, p in zip(layer.fields, layer.shadow, strict=True):
        torch.testing.assert_close(p.grad.double(), params[f].grad, rtol=1e-4, atol=1e-4)


def test_prepare_freezes_everything_else(backend):
    model = _model({"id": "int8"}, backend)
    model.append(nn.LayerNorm(8))
    prepare_for_training(model)
    assert not any(p.requires_grad for p in model[3].parameters())
    assert model[0].bias.requires_grad and all(p.requires_grad for p in model[0].shadow)


def test_untrainable_codec_names_itself(backend):
    enc = rbe_core.get_codec("raw").encode(np.ones((4, 4), np.float32))
    model = nn.Sequential(RBELinear.from_encoded(enc, None, backend))
    with pytest.raises(rbe_core.RBEError, match="'raw' has no torch form"):
        prepare_for_training(model)


# ---- trainable embeddings -------------------------------------------------------------------------

EMB_CODECS = [{"id": "int8"}, {"id": "int4", "group_size": 16}]


def _embedding(cfg, rows=40, dim=24):
    from rbe_core.layers import RBEEmbedding

    table = torch.randn(rows, dim, generator=torch.Generator().manual_seed(2)) * 0.5
    return nn.Sequential(RBEEmbedding(rbe_core.get_codec(cfg).encode(table)), nn.Linear(dim, 3))


@pytest.mark.parametrize("cfg", EMB_CODECS, ids=lambda c: c["id"])
def test_embedding_param_grads_gradcheck(cfg):
    from rbe_core.training.trainable import TrainableRBEEmbedding, decode_rows

    model = _embedding(cfg)
    assert prepare_for_training(model) == ["0"]
    emb = model[0]
    assert isinstance(emb, TrainableRBEEmbedding) and emb.row_wise
    rows = np.array([1, 5, 6, 39])
    params = [p.detach().double().clone().requires_grad_() for p in emb.shadow]
    # the restricted decode is differentiable in float64 and its gradients are exact
    def restricted(*ps):
        return decode_rows(emb.form, emb.encoded, dict(zip(emb.fields, ps, strict=True)), rows)

    torch.autograd.gradcheck(restricted, params, eps=1e-6, atol=1e-6)
    # the layer's parameter gradients equal autograd through the full-table decode
    ids = torch.tensor([[5, 1, 5], [39, 6, 1]])
    up = torch.randn(2, 3, emb.embedding_dim, generator=torch.Generator().manual_seed(3))
    (emb(ids) * up).sum().backward()
    full = emb.form.decode(emb.encoded, dict(zip(emb.fields, params, strict=True)))
    (full[ids] * up.double()).sum().backward()
    for p, ref in zip(emb.shadow, params, strict=True):
        torch.testing.assert_close(p.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("cfg", EMB_CODECS, ids=lambda c: c["id"])
def test_embedding_trains_finalizes_and_round_trips(cfg, tmp_path, monkeypatch):
    from rbe_core.layers import RBEEmbedding

    model = _embedding(cfg)
    ids = torch.randint(0, 40, (8, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        target = model[0](ids) * 1.3 + 0.05
    prepare_for_training(model)
    emb = model[0]
    codec_type = type(emb.encoded.codec)
    full_rows = []
    orig = emb.form.decode
    monkeypatch.setattr(codec_type, "decode", lambda *a, **k: pytest.fail("the full table was decoded"))
    monkeypatch.setattr(emb.form, "decode", lambda enc, params: full_rows.append(enc.shape[0]) or orig(enc, params))
    losses = _fit(list(emb.shadow), lambda: ((emb(ids) - target) ** 2).mean(), lr=3e-3)
    assert np.mean(losses[-3:]) < 0.8 * losses[0]
    assert full_rows and max(full_rows) == len(ids.unique()) < 40  # only the requested rows
    with torch.no_grad():
        trained = emb(ids)
    monkeypatch.undo()
    encoded = finalize(model)
    assert set(encoded) == {"0"} and isinstance(model[0], RBEEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(model[0](ids), trained, rtol=1e-6, atol=1e-6)
    path = rbe_core.save(tmp_path / "emb.rbe", encoded)
    with rbe_core.open(path) as f:
        assert f["0"].codec.get_config() == encoded["0"].codec.get_config()
        np.testing.assert_array_equal(f["0"].decode(), encoded["0"].decode())
        torch.testing.assert_close(RBEEmbedding(f["0"])(ids), trained, rtol=1e-6, atol=1e-6)


def test_tied_embedding_is_left_to_its_head(backend):
    from rbe_core.layers import RBEEmbedding

    enc = rbe_core.get_codec("int8").encode(torch.randn(16, 8))
    model = nn.Sequential(RBEEmbedding(enc), RBELinear.from_encoded(enc, None, backend))
    assert prepare_for_training(model) == ["1"]
    assert isinstance(model[0], RBEEmbedding)
    assert prepare_for_training(_embedding({"id": "int8"}), embeddings=False) == []


def test_finetune_trains_an_untied_embedding(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from _model_helpers import tiny_llama, write_gguf

    write_gguf(tiny_llama(tie_word_embeddings=False), tmp_path / "t.gguf")
    src = rbe_core.compress_model(tmp_path / "t.gguf", tmp_path / "t.rbe", codec={"id": "int8"}, progress=False,
                                  calibration=False)
    words = "the of and to in is it that for on with as was at by an be this from".split()
    (tmp_path / "x.txt").write_text(" ".join(np.random.default_rng(0).choice(words, 600)))
    res = rbe_core.finetune(src, tmp_path / "x.txt", tmp_path / "o.rbe", steps=2, lr=3e-2, batch_tokens=32,
                            seq_len=16, progress=False)
    with rbe_core.open(res.path) as f, rbe_core.open(src) as before:
        assert f.headers["token_embd.weight"]["codec"]["id"] == "int8"
        assert f.headers["token_embd.weight"]["sha256"] != before.headers["token_embd.weight"]["sha256"]
        assert f.status("token_embd.weight") == "ok"
