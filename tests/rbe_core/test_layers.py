"""RBELinear / RBEEmbedding / RBEAttention / RBEFFN against plain torch on decoded weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import rbe_core  # noqa: E402
from rbe_core.layers import RBEFFN, RBEAttention, RBEEmbedding, RBELinear, RotaryEmbedding  # noqa: E402


def _enc(shape, seed=0, codec="int8"):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.1
    return rbe_core.get_codec(codec).encode(w)


class _NoWholeDecode:
    """Make ``codec.decode`` (the whole matrix) fail, so a test proves the fused path avoids it."""

    def __init__(self, monkeypatch, enc):
        def boom(*a, **k):
            raise AssertionError("the fused path decoded the whole weight")

        monkeypatch.setattr(type(enc.codec), "decode", boom)


@pytest.mark.parametrize("transposed", [False, True])
def test_linear_forward_backward_matches_dense(transposed, monkeypatch):
    enc = _enc((24, 40))
    dense = torch.from_numpy(enc.decode())  # decoded before decode() is disabled
    w = dense.T if transposed else dense  # nn.Linear layout (out, in)
    bias = torch.randn(w.shape[0])
    layer = RBELinear.from_encoded(enc, bias, transposed=transposed)
    assert (layer.out_features, layer.in_features) == tuple(w.shape)
    _NoWholeDecode(monkeypatch, enc)
    x = torch.randn(3, 5, w.shape[1], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = bias.clone().requires_grad_(True)
    y = layer(x)
    y_ref = torch.nn.functional.linear(x_ref, w, bias_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, bias_ref.grad, rtol=1e-5, atol=1e-5)


def test_linear_rejects_bad_bias():
    with pytest.raises(ValueError, match="bias"):
        RBELinear.from_encoded(_enc((4, 8)), np.zeros(5, np.float32))


def test_embedding_decodes_only_requested_rows(monkeypatch):
    enc = _enc((50, 16))
    table = torch.from_numpy(enc.decode())
    seen = []
    original = type(enc.codec).decode_rows

    def spy(self, encoded, start, stop):
        seen.append((start, stop))
        return original(self, encoded, start, stop)

    monkeypatch.setattr(type(enc.codec), "decode_rows", spy)
    ids = torch.tensor([[3, 4, 5, 40], [4, 3, 17, 40]])
    out = RBEEmbedding(enc)(ids)
    torch.testing.assert_close(out, table[ids])
    assert sorted(seen) == [(3, 6), (17, 18), (40, 41)]
    with pytest.raises(IndexError):
        RBEEmbedding(enc)(torch.tensor([50]))


def test_ffn_swiglu_and_gelu():
    up, gate, down = _enc((32, 16), 1), _enc((32, 16), 2), _enc((16, 32), 3)
    W = {k: torch.from_numpy(e.decode()) for k, e in dict(up=up, gate=gate, down=down).items()}
    x = torch.randn(2, 7, 16)
    lin = RBELinear.from_encoded
    swiglu = RBEFFN(lin(up), lin(down), gate=lin(gate), activation="silu")
    ref = (torch.nn.functional.silu(x @ W["gate"].T) * (x @ W["up"].T)) @ W["down"].T
    torch.testing.assert_close(swiglu(x), ref, rtol=1e-5, atol=1e-5)
    gelu = RBEFFN(lin(up), lin(down), activation="gelu")
    torch.testing.assert_close(gelu(x), torch.nn.functional.gelu(x @ W["up"].T) @ W["down"].T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        RBEFFN(lin(up), lin(down), activation="swish2")


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_attention_gqa_kv_cache_equals_full_pass(style):
    hd, heads, kv = 8, 4, 2
    lin = RBELinear.from_encoded
    attn = RBEAttention(q=lin(_enc((heads * hd, 32), 1)), k=lin(_enc((kv * hd, 32), 2)),
                        v=lin(_enc((kv * hd, 32), 3)), o=lin(_enc((32, heads * hd), 4)),
                        n_heads=heads, n_kv_heads=kv, head_dim=hd, rope=RotaryEmbedding(hd, 100.0, style))
    x = torch.randn(2, 9, 32)
    full, _ = attn(x)
    first, cache = attn(x[:, :5])
    rest = []
    for t in range(5, 9):
        out, cache = attn(x[:, t:t + 1], past=cache)
        rest.append(out)
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, rtol=1e-5, atol=1e-5)
    # causal: the first 5 outputs do not depend on later tokens
    torch.testing.assert_close(first, full[:, :5], rtol=1e-5, atol=1e-5)
    assert cache[0].shape == (2, kv, 9, hd)


def test_rope_styles_agree_under_llama_cpp_permutation():
    from rbe_core.models.families.decoder import _permute_rows

    hd = 8
    q = torch.randn(1, 1, 3, hd)
    half = RotaryEmbedding(hd, 10000.0, "half")(q, 2)
    perm = torch.from_numpy(_permute_rows(np.eye(hd, dtype=np.float32), 1, inverse=False))
    inter = RotaryEmbedding(hd, 10000.0, "interleaved")(q @ perm.T, 2)
    torch.testing.assert_close(inter, half @ perm.T, rtol=1e-6, atol=1e-6)
