"""cyclic8 / cyclic16: the derivative-cycle tables and the nearest-level bound."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import rbe_core
from rbe_plugins.cyclic8 import cyclic8_table
from rbe_plugins.cyclic16 import cyclic16_table


def test_cyclic8_tables_follow_real_cycles():
    t = cyclic8_table().astype(int)
    assert t.shape == (4, 4, 16)
    for d in range(4):  # sin: one derivative = a quarter turn = 4 of 16 phases
        np.testing.assert_array_equal(t[0, (d + 1) % 4], np.roll(t[0, d], -4))
    np.testing.assert_array_equal(t[1, 2], t[1, 0])  # sinh -> cosh -> sinh (Z/2)
    np.testing.assert_array_equal(t[1, 3], t[1, 1])
    assert not np.array_equal(t[2, 0], t[2, 2])  # tanh has no cycle


def test_cyclic16_table_is_a_quarter_turn_per_derivative():
    t = cyclic16_table().astype(int)
    for d in range(4):
        np.testing.assert_array_equal(t[(d + 1) % 4], np.roll(t[d], -64))


def test_code_fields_decode_through_the_table():
    codec = rbe_core.get_codec({"id": "cyclic16", "group_size": 4})
    code = np.array([[(63 << 10) | (1 << 8) | 0, (32 << 10) | (0 << 8) | 64, 0, 7]], dtype=np.uint16)
    enc = rbe_core.Encoded(codec, (1, 4), {"code": code, "scale": np.float16([[2.0]])})
    codec.validate(enc)
    out = enc.decode()
    assert out[0, 0] == 2.0  # amplitude 63, cos(0) = 1
    np.testing.assert_allclose(out[0, 1], 2.0 * 32 / 63, rtol=1e-6)  # sin(π/2)
    assert out[0, 2] == 0.0 and out[0, 3] == 0.0  # amplitude 0


@settings(max_examples=20, deadline=None)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 70)), elements=st.floats(-100, 100, width=32)),
    st.sampled_from(["cyclic8", "cyclic16"]),
)
def test_nearest_level_bound(w, cid):
    codec = rbe_core.get_codec({"id": cid, "group_size": 16})
    enc = codec.encode(w)
    levels = np.unique(codec.lut().astype(np.float64))
    half_gap = np.diff(levels).max() / 2
    scale = np.repeat(enc.payload["scale"].astype(np.float32), 16, axis=1)[:, : w.shape[1]]
    assert np.all(np.abs(enc.decode() - w) <= scale * half_gap * (1 + 1e-5) + 1e-6)
