"""The hadamard codec's training form: decode and the rotated-basis linear mirror the codec, write
round-trips, gradcheck of the autograd engine (float64), and a trainable layer built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rbe_core
from rbe_core.training.trainable import TrainableRBELinear, get_engine, torch_form
from rbe_plugins.torch_engines import weight_grad

CODECS = [
    {"id": "hadamard", "bits": 3, "group_size": 8},
    {"id": "hadamard", "bits": 2, "group_size": 8, "max_block": 8},  # several Hadamard blocks
    {"id": "hadamard", "bits": 8, "group_size": 16},
    {"id": "hadamard", "bits": 4, "group_size": 8, "grid": "normal"},  # the flagship's grid
]


def _ids(cfg):
    return (f"b{cfg['bits']}-g{cfg['group_size']}" + (f"-m{cfg['max_block']}" if "max_block" in cfg else "")
            + (f"-{cfg['grid']}" if "grid" in cfg else ""))


@pytest.fixture(params=CODECS, ids=_ids)
def encoded(request):
    w = np.random.default_rng(5).standard_normal((6, 20)).astype(np.float32)
    w[1] = 0.0  # an all-zero row (zero scales) stays zero
    return rbe_core.get_codec(request.param).encode(w)


def test_form_decode_matches_codec(encoded):
    form = torch_form(encoded.codec)
    ref = encoded.decode()
    for dtype in (torch.float64, torch.float32):
        params = {k: torch.from_numpy(v).to(dtype) for k, v in form.params(encoded).items()}
        got = form.decode(encoded, params).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-6 * np.abs(ref).max())
    assert not ref[1].any()
    rewritten = form.write(encoded, form.params(encoded))
    np.testing.assert_array_equal(rewritten.decode(), ref)
    for f in ("codes", "scale_code", "row_scale"):
        np.testing.assert_array_equal(rewritten.payload[f], encoded.payload[f])


def test_write_rounds_group_scales_to_codes(encoded):
    form = torch_form(encoded.codec)
    p = form.params(encoded)
    p["log_scale"] = np.log(np.exp(p["log_scale"]) + 0.3)  # a third of a code step up: same codes
    p["log_row_scale"] = p["log_row_scale"] + 0.01
    out = form.write(encoded, p)
    np.testing.assert_array_equal(out.payload["scale_code"], encoded.payload["scale_code"])
    np.testing.assert_allclose(out.payload["row_scale"], encoded.payload["row_scale"] * np.exp(0.01), rtol=1e-6)


class _EngineLoss(torch.autograd.Function):
    """y = x @ W(params).T in float64 through the form; backward from the autograd engine."""

    @staticmethod
    def forward(ctx, x, encoded, fields, *params):
        ctx.args = (x, encoded, fields, params)
        return x @ torch_form(encoded.codec).decode(encoded, dict(zip(fields, params, strict=True))).T

    @staticmethod
    def backward(ctx, grad_out):
        x, encoded, fields, params = ctx.args
        grads = get_engine("autograd").param_grads(encoded, weight_grad(x, grad_out), dict(zip(fields, params, strict=True)))
        return (None, None, None, *[grads[f] for f in fields])


def test_gradcheck_autograd_engine(encoded):
    form = torch_form(encoded.codec)
    rng = np.random.default_rng(3)
    params = [torch.tensor(v + 1e-3 * rng.standard_normal(v.shape), dtype=torch.float64, requires_grad=True)
              for v in (form.params(encoded)[f] for f in form.fields)]
    x = torch.randn(3, encoded.matrix_shape[1], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *p: _EngineLoss.apply(x, encoded, form.fields, *p), params, eps=1e-6, atol=1e-6)


def test_trainable_layer_matches_dense_reference(encoded):
    layer = TrainableRBELinear(rbe_core.RBELinear.from_encoded(encoded))
    x = torch.randn(4, encoded.matrix_shape[1])
    layer(x).square().sum().backward()
    form = torch_form(encoded.codec)
    leaves = {k: torch.from_numpy(v).requires_grad_() for k, v in form.params(encoded).items()}
    (x.double() @ form.decode(encoded, leaves).T).square().sum().backward()
    for f, p in zip(form.fields, layer.shadow, strict=True):
        ref = leaves[f].grad.float()
        torch.testing.assert_close(p.grad, ref, atol=1e-3 * float(ref.abs().max()) + 1e-6, rtol=1e-3)


@pytest.mark.parametrize("transposed", [False, True])
def test_rotated_linear_matches_decode(encoded, transposed):
    form = torch_form(encoded.codec)
    params = {k: torch.from_numpy(v) for k, v in form.params(encoded).items()}
    w = encoded.decode().astype(np.float64)
    x = torch.randn(4, w.shape[0] if transposed else w.shape[1], dtype=torch.float64)
    ref = x.numpy() @ (w if transposed else w.T)
    got = form.linear(x, encoded, params, transposed).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())
