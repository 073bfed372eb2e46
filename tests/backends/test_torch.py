"""The torch backend's kernels on the lowered layout (int8, int4, raw, hadamard) against the numpy reference, its chunk
budget, CUDA when a device is visible, and torch tensors through the C kernels' direct path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import rbe_core
from rbe_backends.torch import ops

CODECS = [
    ("int8", {}),
    ("raw", {}),
    ("int4", {}),
    ("int4", {"group_size": 2}),
    ("int4", {"group_size": 32}),
    ("int4", {"group_size": 48}),
    ("hadamard", {"bits": 3}),
    ("hadamard", {"bits": 4, "grid": "normal"}),
]
SHAPES = [(1, 1), (7, 33), (37, 101), (130, 257)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def rel(a, b) -> float:
    """Relative error in the Frobenius norm."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def encode(codec_id, params, shape, rng):
    return rbe_core.get_codec({"id": codec_id, **params}).encode(rng.standard_normal(shape).astype(np.float32))


def torch_backend(device: str):
    return rbe_core.get_backend("torch" if device == "cpu" else "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codec_id,params", CODECS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 5])
def test_kernels_agree_with_numpy(device, codec_id, params, shape, batch, rng):
    enc = encode(codec_id, params, shape, rng)
    assert ops.prepared(enc, torch.device(device)) is not None  # the lowered path, not the numpy fallback
    ref = rbe_core.get_backend("numpy")
    b = torch_backend(device)
    x = rng.standard_normal((batch, shape[1])).astype(np.float32)
    g = rng.standard_normal((batch, shape[0])).astype(np.float32)
    y = b.linear(torch.from_numpy(x).to(device), enc).cpu().numpy()
    assert rel(y, ref.linear(x, enc)) <= 1e-5
    gi = b.linear_grad_input(torch.from_numpy(g).to(device), enc).cpu().numpy()
    assert rel(gi, ref.linear_grad_input(g, enc)) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codec_id,params", CODECS)
def test_decode_is_exact(device, codec_id, params, rng):
    enc = encode(codec_id, params, (19, 70), rng)
    out = torch_backend(device).decode(enc).cpu().numpy()
    np.testing.assert_array_equal(out, enc.decode())


def test_small_budget_splits_into_chunks_and_agrees(monkeypatch, rng):
    monkeypatch.setenv(ops.CHUNK_ENV, "0.001")  # 262 float32: several rows per chunk at most
    budget = ops.chunk_elements(torch.device("cpu"))
    assert budget == 262
    steps = ops.row_steps(130, 64, torch.device("cpu"))
    assert len(steps) > 10 and all((e - s) * 64 <= budget for s, e in steps)
    assert steps[0][0] == 0 and steps[-1][1] == 130
    ref = rbe_core.get_backend("numpy")
    for codec_id, params in CODECS:
        enc = encode(codec_id, params, (130, 64), rng)
        x = rng.standard_normal((3, 64)).astype(np.float32)
        assert rel(rbe_core.get_backend("torch").linear(x, enc), ref.linear(x, enc)) <= 1e-5


def test_default_budgets_and_bad_setting(monkeypatch):
    monkeypatch.delenv(ops.CHUNK_ENV, raising=False)
    assert ops.chunk_elements(torch.device("cpu")) == ops.DEFAULT_CHUNK_MB["cpu"] << 18
    assert ops.chunk_elements(torch.device("cuda")) == ops.DEFAULT_CHUNK_MB["cuda"] << 18
    for bad in ("0", "-3", "lots"):
        monkeypatch.setenv(ops.CHUNK_ENV, bad)
        with pytest.raises(ValueError, match=ops.CHUNK_ENV):
            ops.chunk_elements(torch.device("cpu"))


def test_other_codecs_fall_back_to_their_numpy_rows(rng):
    enc = encode("hybrid", {}, (16, 64), rng)
    assert ops.prepared(enc, torch.device("cpu")) is None
    x = rng.standard_normal((2, 64)).astype(np.float32)
    y = rbe_core.get_backend("torch").linear(x, enc)
    assert rel(y, x @ enc.decode().reshape(16, 64).T) <= 1e-5


@pytest.mark.parametrize("name", [b["name"] for b in rbe_core.list_backends() if b["available"]])
def test_torch_tensors_in_any_layout_agree(name, rng):
    """3-D, non-contiguous and float64 torch inputs; the cffi backend runs these on the tensor memory."""
    enc = encode("int4", {}, (40, 96), rng)
    b = rbe_core.get_backend(name)
    base = torch.from_numpy(rng.standard_normal((2, 96, 3)))  # float64
    x = base.transpose(1, 2)  # (2, 3, 96), not contiguous
    bias = torch.randn(40, dtype=torch.float64)
    y = b.linear(x, enc, bias)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64 and y.shape == (2, 3, 40)
    ref = x.float().numpy() @ enc.decode().T + bias.float().numpy()
    assert rel(y.cpu().numpy(), ref) <= 1e-5
    g = torch.randn(2, 3, 40)
    gi = b.linear_grad_input(g, enc)
    assert gi.shape == (2, 3, 96) and rel(gi.cpu().numpy(), g.numpy() @ enc.decode()) <= 1e-5


def test_concurrent_calls_from_threads_agree(rng):
    """Several Python threads calling one backend at once (the cffi pool serves one, the others
    run on their own thread) all get the right answer."""
    enc = encode("int4", {}, (512, 640), rng)
    x = rng.standard_normal((2, 640)).astype(np.float32)
    want = rbe_core.get_backend("numpy").linear(x, enc)
    backends = [rbe_core.get_backend(b["name"]) for b in rbe_core.list_backends() if b["available"]]
    errors: list[float] = []

    def work(b):
        for _ in range(5):
            errors.append(rel(b.linear(x, enc), want))

    threads = [threading.Thread(target=work, args=(b,)) for b in backends for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 15 * len(backends) and max(errors) <= 1e-5
