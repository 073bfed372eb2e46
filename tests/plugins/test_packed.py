"""packed64 / packed128: bit layouts and fitting of single-atom blocks."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import rbe_core
from rbe_core.errors import RBEFormatError
from rbe_plugins._packed import render_atoms


def atom_params(n, rng, dc=0.0):
    return {
        "r": rng.uniform(0.5, 2.0, n),
        "omega_x": rng.uniform(0.1, 2.5, n),
        "theta": rng.uniform(0, np.pi / 2, n),
        "d_x": rng.integers(0, 4, n),
        "omega_y": rng.uniform(0.1, 2.5, n),
        "psi": rng.uniform(0, np.pi / 2, n),
        "d_y": rng.integers(0, 4, n),
        "dc": np.full(n, dc),
    }


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(3)
    for cid, tol in (("packed64", 1e-3), ("packed128", 6e-6)):
        codec = rbe_core.get_codec(cid)
        p = atom_params(50, rng, dc=0.25 if cid == "packed128" else 0.0)
        back = codec.unpack(codec.pack(p))
        for key in ("omega_x", "omega_y", "theta", "psi", "r"):
            np.testing.assert_allclose(back[key], p[key], rtol=tol, atol=tol * 2, err_msg=key)
        np.testing.assert_array_equal(back["d_x"], p["d_x"])
        np.testing.assert_array_equal(back["d_y"], p["d_y"])


def test_packed128_state_field_holds_derivative_orders():
    codec = rbe_core.get_codec("packed128")
    p = atom_params(4, np.random.default_rng(0))
    p["d_x"], p["d_y"] = np.array([0, 1, 2, 3]), np.array([3, 2, 1, 0])
    hi = codec.pack(p)[:, 0]
    np.testing.assert_array_equal(hi & np.uint64(3), [0, 1, 2, 3])
    np.testing.assert_array_equal((hi >> np.uint64(2)) & np.uint64(3), [3, 2, 1, 0])


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(["packed64", "packed128"]))
def test_single_atom_blocks_are_recovered(seed, cid):
    b = 16
    codec = rbe_core.get_codec({"id": cid, "block": b})
    p = atom_params(6, np.random.default_rng(seed), dc=0.3 if cid == "packed128" else 0.0)
    blocks = render_atoms(p, b)
    w = blocks.reshape(2, 3, b, b).transpose(0, 2, 1, 3).reshape(2 * b, 3 * b).astype(np.float32)
    out = codec.encode(w).decode().astype(np.float64)
    rmse, rms = np.sqrt(np.mean((out - w) ** 2)), np.sqrt(np.mean(w.astype(np.float64) ** 2))
    # packed128's 7-bit DC level moves in steps of r/32: up to r/64 more error per weight
    slack = p["r"].max() / 64 if cid == "packed128" else 0.0
    assert rmse <= 0.03 * rms + slack


def test_non_finite_amplitude_rejected():
    codec = rbe_core.get_codec("packed128")
    w = np.ones((16, 16), np.float32)
    enc = codec.encode(w)
    code = enc.payload["code"].copy()
    code[0, 1] = (code[0, 1] & ~np.uint64(0xFFFFFFFF)) | np.uint64(np.float32(np.nan).view(np.uint32))
    bad = rbe_core.Encoded(codec, enc.shape, {"code": code})
    try:
        codec.validate(bad)
    except RBEFormatError:
        return
    raise AssertionError("NaN amplitude accepted")


def test_constant_block_is_exact_for_packed128():
    w = np.full((16, 16), 0.75, np.float32)
    out = rbe_core.get_codec("packed128").encode(w).decode()
    np.testing.assert_allclose(out, w, rtol=1e-6)
