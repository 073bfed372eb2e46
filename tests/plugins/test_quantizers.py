"""Quantizers: forward equals dequantize(quantize(x)); STE, LSQ and codebook gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rbe_core.training.trainable import get_quantizer

GRIDS = [(8, True), (4, False), (3, True)]


def _fitted(name, bits, signed, values):
    q = get_quantizer(name, bits=bits, signed=signed)
    q.fit(values)
    return q


@pytest.mark.parametrize("name", ["ste", "lsq"])
@pytest.mark.parametrize(("bits", "signed"), GRIDS)
def test_uniform_forward_is_dequantize_quantize(name, bits, signed):
    v = torch.randn(4, 3, 16, dtype=torch.float64)
    q = _fitted(name, bits, signed, v)
    codes = q.quantize(v)
    assert int(codes.min()) >= q.qmin and int(codes.max()) <= q.qmax
    assert q.qmax - q.qmin == (2**bits - 2 if signed else 2**bits - 1)
    # torch dequantize works in the steps' float32
    torch.testing.assert_close(q.fake_quantize(v), q.dequantize(codes).to(v.dtype), rtol=1e-6, atol=1e-6)
    np_codes = q.quantize(v.numpy())
    np.testing.assert_array_equal(np_codes, codes.numpy().astype(np_codes.dtype))
    np.testing.assert_allclose(q.dequantize(np_codes), q.fake_quantize(v).detach().numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("bits", "signed"), GRIDS)
def test_ste_gradient_passes_inside_and_stops_outside(bits, signed):
    v = torch.randn(2, 32, dtype=torch.float64)
    q = _fitted("ste", bits, signed, v)
    outside = torch.zeros_like(v, dtype=torch.bool)
    outside[:, :4] = True
    with torch.no_grad():
        v[:, :2] += 10.0  # beyond the top of each row's range
        v[:, 2:4] -= 10.0
    v.requires_grad_(True)
    up = torch.randn_like(v)
    (q.fake_quantize(v) * up).sum().backward()
    torch.testing.assert_close(v.grad, torch.where(outside, torch.zeros_like(up), up))
    assert q.parameters() == []


@pytest.mark.parametrize(("bits", "signed"), GRIDS)
def test_lsq_step_gradient(bits, signed):
    v = torch.randn(3, 16, dtype=torch.float64)
    q = _fitted("lsq", bits, signed, v)
    with torch.no_grad():
        q.step.mul_(0.7)  # some values now clip
    up = torch.randn_like(v)
    (q.fake_quantize(v) * up).sum().backward()
    step = q.step.detach().double()
    offset = 0.0 if signed else q.offset.detach().double()
    u = (v - offset) / step
    inside = (u >= q.qmin) & (u <= q.qmax)
    du = torch.where(inside, u.round() - u, u.clamp(q.qmin, q.qmax))
    g = 1.0 / np.sqrt(16 * q.qmax)
    torch.testing.assert_close(q.step.grad.double(), (g * up * du).sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    if not signed:
        torch.testing.assert_close(q.offset.grad.double(), (g * up * (~inside)).sum(-1, keepdim=True),
                                   rtol=1e-5, atol=1e-6)


def test_codebook_kmeans_snap_and_gradients():
    rng = np.random.default_rng(0)
    centres = np.array([-2.0, -0.5, 0.3, 1.7])
    v = torch.from_numpy(centres[rng.integers(0, 4, 400)] + 0.01 * rng.standard_normal(400))
    q = get_quantizer("codebook", bits=2)
    q.fit(v)
    np.testing.assert_allclose(np.sort(q.centroids.detach().numpy()), centres, atol=0.01)
    codes = q.quantize(v)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 4
    torch.testing.assert_close(q.fake_quantize(v), q.dequantize(codes).to(v.dtype))
    np.testing.assert_array_equal(q.quantize(v.numpy()), codes.numpy())
    x = v.clone().requires_grad_(True)
    up = torch.randn_like(x)
    (q.fake_quantize(x) * up).sum().backward()
    torch.testing.assert_close(x.grad, up)
    expected = torch.zeros(4, dtype=torch.float64).index_add_(0, codes.long(), up)
    torch.testing.assert_close(q.centroids.grad.double(), expected, rtol=1e-5, atol=1e-5)
