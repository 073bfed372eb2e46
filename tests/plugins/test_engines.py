"""Derivative engines: gradcheck of every engine x trainable codec, the cyclic table, grad_input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rbe_core
from rbe_core.errors import RBEError
from rbe_core.training.forms import PhaseForm, sin_cycle
from rbe_core.training.trainable import get_engine, torch_form
from rbe_plugins.torch_engines import weight_grad

CODECS = [
    {"id": "int8"},
    {"id": "int4", "group_size": 8},
    {"id": "cyclic8", "group_size": 8},
    {"id": "cyclic16", "group_size": 8},
    {"id": "packed64", "block": 4},
    {"id": "packed128", "block": 4},
]
ENGINES = ["autograd", "cyclic"]


def _ids(cfg):
    return cfg["id"]


@pytest.fixture(params=CODECS, ids=_ids)
def encoded(request):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 10)).astype(np.float32)
    return rbe_core.get_codec(request.param).encode(w)


def test_form_decode_matches_codec(encoded):
    form = torch_form(encoded.codec)
    params = {k: torch.from_numpy(v) for k, v in form.params(encoded).items()}
    got = form.decode(encoded, params).numpy()
    ref = encoded.decode()
    # cyclic16's table holds sin to 1/32767; every other form is exact up to float32 rounding
    tol = 1e-4 if encoded.codec.codec_id == "cyclic16" else 1e-6
    np.testing.assert_allclose(got, ref, atol=tol * np.abs(ref).max())
    rewritten = form.write(encoded, form.params(encoded))
    np.testing.assert_array_equal(rewritten.decode(), ref)


class _EngineLoss(torch.autograd.Function):
    """y = x @ W(params).T in float64 through the form; backward from the engine under test."""

    @staticmethod
    def forward(ctx, x, engine, encoded, fields, *params):
        form = torch_form(encoded.codec)
        ctx.args = (x, engine, encoded, fields, params)
        return x @ form.decode(encoded, dict(zip(fields, params, strict=True))).T

    @staticmethod
    def backward(ctx, grad_out):
        x, engine, encoded, fields, params = ctx.args
        grads = engine.param_grads(encoded, weight_grad(x, grad_out), dict(zip(fields, params, strict=True)))
        return (None, None, None, None, *[grads[f] for f in fields])


@pytest.mark.parametrize("engine_name", ENGINES)
def test_gradcheck(engine_name, encoded):
    engine, form = get_engine(engine_name), torch_form(encoded.codec)
    if engine_name == "cyclic" and not isinstance(form, PhaseForm):
        with pytest.raises(RBEError, match="cyclic engine"):
            engine.param_grads(encoded, torch.zeros(encoded.matrix_shape, dtype=torch.float64))
        return
    rng = np.random.default_rng(3)
    # a point near the stored values, off the storage grid
    params = [torch.tensor(v + 1e-3 * rng.standard_normal(v.shape), dtype=torch.float64, requires_grad=True)
              for v in (form.params(encoded)[f] for f in form.fields)]
    x = torch.randn(3, encoded.matrix_shape[1], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *p: _EngineLoss.apply(x, engine, encoded, form.fields, *p), params, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", [c for c in CODECS if isinstance(torch_form(rbe_core.get_codec(c)), PhaseForm)], ids=_ids)
def test_cyclic_equals_reference(cfg):
    w = np.random.default_rng(5).standard_normal((9, 13)).astype(np.float32)
    enc = rbe_core.get_codec(cfg).encode(w)
    grad_w = torch.randn(enc.matrix_shape, dtype=torch.float64)
    ref = get_engine("autograd").param_grads(enc, grad_w)
    got = get_engine("cyclic").param_grads(enc, grad_w)
    assert set(ref) == set(got) == set(torch_form(enc.codec).fields)
    for field in ref:
        torch.testing.assert_close(got[field], ref[field], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("order", range(8))
def test_sin_cycle_table_against_finite_differences(order):
    t = torch.linspace(-7, 7, 101, dtype=torch.float64)
    h = 1e-5
    numeric = (sin_cycle(t + h, order) - sin_cycle(t - h, order)) / (2 * h)
    torch.testing.assert_close(sin_cycle(t, order + 1), numeric, rtol=0, atol=1e-9)
    torch.testing.assert_close(sin_cycle(t, order), torch.sin(t + order * torch.pi / 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("engine_name", ENGINES)
def test_grad_input_through_backend(engine_name, transposed, backend):
    enc = rbe_core.get_codec({"id": "packed128", "block": 4}).encode(
        np.random.default_rng(2).standard_normal((8, 12)).astype(np.float32))
    w = torch.from_numpy(enc.decode())
    width_in, width_out = (8, 12) if transposed else (12, 8)
    x, go = torch.randn(2, 5, width_in), torch.randn(2, 5, width_out)
    grad_input, grads = get_engine(engine_name).backward(enc, x, go, backend=backend, transposed=transposed)
    torch.testing.assert_close(grad_input.cpu(), go @ (w.T if transposed else w), rtol=1e-4, atol=1e-4)
    assert set(grads) == set(torch_form(enc.codec).fields)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("engine_name", ENGINES)
@pytest.mark.parametrize("cfg", [{"id": "int8"}, {"id": "int4", "group_size": 8}, {"id": "cyclic8", "group_size": 8},
                                 {"id": "cyclic16", "group_size": 8},
                                 {"id": "hadamard", "bits": 3, "group_size": 8, "max_block": 8}], ids=_ids)
def test_row_chunked_param_grads_equal_whole(cfg, engine_name, transposed, backend, monkeypatch):
    """Row-wise forms take parameter gradients a row chunk at a time; the result is the whole-matrix one."""
    import rbe_plugins.torch_engines as engines

    enc = rbe_core.get_codec(cfg).encode(np.random.default_rng(4).standard_normal((23, 16)).astype(np.float32))
    form = torch_form(enc.codec)
    assert form.row_wise
    if engine_name == "cyclic" and not isinstance(form, PhaseForm):
        pytest.skip("the cyclic engine needs a PhaseForm")
    rows, cols = enc.matrix_shape
    x = torch.randn(3, 4, cols if not transposed else rows, dtype=torch.float64)
    go = torch.randn(3, 4, rows if not transposed else cols, dtype=torch.float64)
    engine = get_engine(engine_name)
    whole = engine.param_grads(enc, weight_grad(x, go, transposed))
    monkeypatch.setattr(engines, "CHUNK_ELEMENTS", 5 * cols)  # 5 rows per chunk: 5 chunks, the last short
    _, chunked = engine.backward(enc, x, go, backend=backend, transposed=transposed)
    assert set(chunked) == set(whole)
    for field in whole:
        assert chunked[field].shape == whole[field].shape
        torch.testing.assert_close(chunked[field], whole[field], rtol=1e-9, atol=1e-9)
