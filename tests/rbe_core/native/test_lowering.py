"""Lowering to the canonical layout is exact: ``lower(enc).decode()`` equals ``enc.decode()`` bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import rbe_core
from rbe_core.native.lowering import (
    HadamardTransform,
    Lowered,
    lower,
    pack_nibble_blocks,
    unpack_nibble_blocks,
)

LOWERED_CODECS = [
    "int8",
    "int4",
    {"id": "int4", "group_size": 32},
    {"id": "int4", "group_size": 2},
    "raw",
    *({"id": "hadamard", "bits": b, "grid": g} for b in range(2, 9) for g in ("uniform", "normal")),
    {"id": "hadamard", "bits": 4, "group_size": 128, "max_block": 128},
]
SHAPES = [(1, 1), (7, 33), (70, 200), (5, 576)]


@pytest.mark.parametrize("config", LOWERED_CODECS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lowered_decode_is_bit_identical(config, shape):
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 0.1
    enc = rbe_core.get_codec(config).encode(w)
    low = lower(enc)
    assert isinstance(low, Lowered)
    assert (low.rows, low.cols) == shape and low.cols_p >= shape[1]
    assert np.array_equal(low.decode(), enc.decode().reshape(shape))
    assert np.array_equal(low.decode_rows(1, shape[0]), enc.decode_rows(1, shape[0]))
    assert lower(enc) is low  # cached per tensor
    assert lower(enc, cache=False) is not low


def test_codecs_without_lowering_and_vectors_give_none():
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    assert lower(rbe_core.get_codec("hybrid").encode(w)) is None
    assert lower(rbe_core.get_codec("raw").encode(w[0])) is None


def test_transform_rotate_unrotate_are_inverse():
    t = HadamardTransform(np.where(np.arange(96) % 3, 1.0, -1.0).astype(np.float32), (64, 32))
    x = np.random.default_rng(1).standard_normal((4, 96)).astype(np.float32)
    np.testing.assert_allclose(t.unrotate(t.rotate(x)), x, atol=1e-5)
    assert t.key == HadamardTransform(t.signs.copy(), (64, 32)).key


@pytest.mark.parametrize("blocks", [(64, 32), (1,), (2,), (512, 64), (4096,)])
def test_sandwich_is_the_rotation_on_both_sides(blocks):
    n = sum(blocks)
    t = HadamardTransform(np.where(np.arange(n) % 3, 1.0, -1.0).astype(np.float32), blocks)
    x = np.random.default_rng(2).standard_normal((n, n))
    h = x @ x.T
    expect = t.rotate(np.ascontiguousarray(t.rotate(h).T))
    np.testing.assert_allclose(t.sandwich(h), expect, rtol=0, atol=1e-12 * np.abs(expect).max())


def test_inconsistent_layouts_are_refused():
    codes = np.zeros((2, 32), np.uint8)
    with pytest.raises(ValueError, match="levels"):
        Lowered(2, 32, 4, 32, codes=codes, levels=np.zeros(8, np.float32), step=np.ones((2, 1), np.float32))
    with pytest.raises(ValueError, match="narrower"):
        Lowered(2, 40, 4, 32, codes=codes, levels=np.zeros(16, np.float32), step=np.ones((2, 1), np.float32))
    with pytest.raises(ValueError, match="bits"):
        Lowered(2, 32, 9, 32, codes=codes)


def test_nibble_blocks_pair_each_block_halves():
    """Byte t of a 32-column block holds code t (low nibble) and code t + 16 (high nibble)."""
    codes = np.random.default_rng(1).integers(0, 16, (3, 96)).astype(np.uint8)
    nib = pack_nibble_blocks(codes)
    assert nib.shape == (3, 48) and nib.dtype == np.uint8
    for b in range(3):
        block = codes[:, 32 * b : 32 * b + 32]
        np.testing.assert_array_equal(nib[:, 16 * b : 16 * b + 16], block[:, :16] | (block[:, 16:] << 4))
    np.testing.assert_array_equal(unpack_nibble_blocks(nib), codes)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_nibble_blocks(codes[:, :48])


def test_lowered_nibbles_stand_for_their_codes():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, (5, 64)).astype(np.uint8)
    arrays = {"levels": np.arange(16, dtype=np.float32) - 7.5, "step": rng.random((5, 1), dtype=np.float32)}
    plain, packed = Lowered(5, 50, 4, 64, codes=codes, **arrays), Lowered(5, 50, 4, 64, nibbles=pack_nibble_blocks(codes), **arrays)
    assert packed.cols_p == 64
    np.testing.assert_array_equal(packed.codes, codes)  # unpacked on first use
    np.testing.assert_array_equal(packed.decode(), plain.decode())
    assert packed.with_values(step=arrays["step"] * 2).nibbles is packed.nibbles
    assert packed.with_values(codes=codes).nibbles is None  # new codes: the packing no longer holds
    with pytest.raises(ValueError, match="at most 4 bits"):
        Lowered(5, 50, 5, 64, nibbles=pack_nibble_blocks(codes), levels=np.zeros(32, np.float32), step=arrays["step"])
    with pytest.raises(ValueError, match="nibbles"):
        Lowered(5, 50, 4, 64, nibbles=pack_nibble_blocks(codes).astype(np.int8), **arrays)
