"""int4: the exact layout (another kernel is written against it) and the round-to-nearest bound."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import rbe_core
from rbe_core.native.lowering import lower, unpack_nibble_blocks
from rbe_plugins._blocks import pack_nibbles


def test_layout_nibbles_groups_and_padding():
    codec = rbe_core.get_codec({"id": "int4", "group_size": 8})
    w = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 15, 14, 13]], dtype=np.float32)  # 11 cols -> cols_p 16
    enc = codec.encode(w)
    p = enc.payload
    assert p["q"].shape == (1, 8) and p["q"].dtype == np.uint8
    assert p["scale"].shape == (1, 2) and p["scale"].dtype == np.float16
    assert p["minimum"].shape == (1, 2) and p["minimum"].dtype == np.float16
    # group 0 spans 0..7 -> minimum 0, scale: the smallest float16 with 15 * scale >= 7;
    # group 1 holds 15, 14, 13 and five padding zeros -> scale 1
    s0 = np.float16(7 / 15)
    s0 = s0 if np.float32(s0) * 15 >= 7 else np.nextafter(s0, np.float16(1))
    np.testing.assert_array_equal(p["minimum"], np.float16([[0, 0]]))
    np.testing.assert_array_equal(p["scale"], np.float16([[s0, 1.0]]))
    q = np.rint(np.array([0, 1, 2, 3, 4, 5, 6, 7]) / np.float32(s0)).astype(np.uint8)
    assert p["q"][0, 0] == q[0] | (q[1] << 4)  # low nibble = even column
    assert p["q"][0, 3] == q[6] | (q[7] << 4)
    assert p["q"][0, 4] == 15 | (14 << 4) and p["q"][0, 5] == 13  # then zero padding
    lo, hi = p["q"] & 15, p["q"] >> 4
    manual = np.stack([lo, hi], -1).reshape(1, 16).astype(np.float32)
    manual = manual * np.repeat(p["scale"].astype(np.float32), 8, axis=1) + np.repeat(p["minimum"].astype(np.float32), 8, axis=1)
    np.testing.assert_array_equal(enc.decode(), manual[:, :11])


def test_bits_per_weight_near_four_and_a_half():
    w = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    enc = rbe_core.get_codec("int4").encode(w)
    assert 4.5 <= enc.bits_per_weight < 4.51
    assert enc.payload_nbytes * 8 / w.size == 4.5


@settings(max_examples=25, deadline=None)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 90)), elements=st.floats(-1e3, 1e3, width=32)),
    st.sampled_from([2, 16, 64]),
)
def test_round_to_nearest_bound(w, group):
    codec = rbe_core.get_codec({"id": "int4", "group_size": group})
    enc = codec.encode(w)
    out = enc.decode()
    scale = np.repeat(enc.payload["scale"].astype(np.float32), group, axis=1)[:, : w.shape[1]]
    # half a step, plus float16 rounding of the minimum and float32 arithmetic
    bound = 0.5 * scale + np.abs(w) * 2e-3 + 1e-3
    assert np.all(np.abs(out - w) <= bound)


def test_widths_of_32_columns_store_the_engines_nibble_blocks():
    """Where the padded width is a multiple of 32 the codes are ``nibbles`` (the native engine
    reads them in place); a payload of ``q`` pairs (files written before) validates, decodes,
    lowers and trains to the same values."""
    codec = rbe_core.get_codec("int4")
    w = np.random.default_rng(4).standard_normal((5, 90)).astype(np.float32)  # cols_p 128
    enc = codec.encode(w)
    assert "q" not in enc.payload and enc.payload["nibbles"].shape == (5, 64)
    q = unpack_nibble_blocks(enc.payload["nibbles"])
    pairs = rbe_core.Encoded(codec, enc.shape, {"q": pack_nibbles(q), "scale": enc.payload["scale"],
                                                "minimum": enc.payload["minimum"]})
    codec.validate(pairs)
    np.testing.assert_array_equal(pairs.decode(), enc.decode())
    assert lower(enc).nibbles is enc.payload["nibbles"]
    np.testing.assert_array_equal(lower(pairs).codes, q)
    form = codec.torch_form()
    for e in (enc, pairs):
        params = {k: torch.from_numpy(v) for k, v in form.params(e).items()}
        np.testing.assert_allclose(form.decode(e, params).numpy(), enc.decode(), rtol=1e-6, atol=1e-7)
        assert form.write(e, params).payload.keys() == e.payload.keys()
    assert "q" in rbe_core.get_codec({"id": "int4", "group_size": 2}).encode(w[:, :50]).payload  # cols_p 50
