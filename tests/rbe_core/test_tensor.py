import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rbe_core
from rbe_core import RBETensor
from rbe_core.errors import InvalidWeightError, RBEFormatError
from rbe_core.tensor import LAYOUT_KEY, BlockLayout

FAST = settings(max_examples=60, deadline=None)


def arr(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@st.composite
def layouts(draw):
    rows, cols = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    return BlockLayout(rows, cols, draw(st.integers(1, rows + 3)), draw(st.integers(1, cols + 3)))


@st.composite
def tensors(draw, rows=None, cols=None, block=None):
    """(RBETensor with the exact raw codec, its dense values)."""
    rows = rows or draw(st.integers(1, 12))
    cols = cols or draw(st.integers(1, 12))
    block = block or (draw(st.integers(1, rows)), draw(st.integers(1, cols)))
    values = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal((rows, cols)).astype(np.float32)
    return RBETensor.from_array(values, "raw", block), values


# ---- coordinates ------------------------------------------------------------------------------


@FAST
@given(lay=layouts(), data=st.data())
def test_coordinate_mapping_round_trips(lay, data):
    i, j = data.draw(st.integers(0, lay.rows - 1)), data.draw(st.integers(0, lay.cols - 1))
    bi, bj, li, lj = lay.logical_to_block(i, j)
    r0, c0 = lay.block_to_logical(bi, bj)
    h, w = lay.block_extent(bi, bj)
    assert (r0 + li, c0 + lj) == (i, j) and 0 <= li < h and 0 <= lj < w
    assert lay.logical_to_block(i - lay.rows, j - lay.cols) == (bi, bj, li, lj)  # negative indices
    assert lay.block_coords(lay.block_id(bi, bj)) == (bi, bj)
    gr, gc = lay.grid
    assert sum(lay.block_extent(k, 0)[0] for k in range(gr)) == lay.rows
    assert sum(lay.block_extent(0, k)[1] for k in range(gc)) == lay.cols
    assert lay.num_blocks == gr * gc


def test_layout_rejects_bad_input():
    lay = BlockLayout(5, 7, 2, 3)
    with pytest.raises(IndexError, match="row index 5"):
        lay.logical_to_block(5, 0)
    with pytest.raises(IndexError, match="block column"):
        lay.block_to_logical(0, 3)
    with pytest.raises(TypeError):
        lay.logical_to_block(1.5, 0)
    with pytest.raises(ValueError, match="block_rows must be a positive integer"):
        BlockLayout(5, 7, 0, 3)


# ---- decoding and access ----------------------------------------------------------------------


@FAST
@given(tv=tensors(), data=st.data())
def test_get_rows_block_decode_match_numpy(tv, data):
    t, a = tv
    np.testing.assert_array_equal(t.decode(), a)
    i, j = data.draw(st.integers(0, a.shape[0] - 1)), data.draw(st.integers(0, a.shape[1] - 1))
    assert t.get(i, j) == a[i, j] and t.get(-1, -1) == a[-1, -1]
    start = data.draw(st.integers(0, a.shape[0]))
    stop = data.draw(st.integers(start, a.shape[0]))
    np.testing.assert_array_equal(t.rows(start, stop), a[start:stop])
    bi, bj = data.draw(st.integers(0, t.grid[0] - 1)), data.draw(st.integers(0, t.grid[1] - 1))
    (r0, c0), (h, w) = t.layout.block_to_logical(bi, bj), t.layout.block_extent(bi, bj)
    np.testing.assert_array_equal(t.block(bi, bj), a[r0:r0 + h, c0:c0 + w])
    np.testing.assert_array_equal(t.to_torch().numpy(), a)
    np.testing.assert_array_equal(np.asarray(t), a)


@FAST
@given(tv=tensors(), data=st.data())
def test_set_reencodes_only_the_affected_block(tv, data):
    t, a = tv
    i, j = data.draw(st.integers(0, a.shape[0] - 1)), data.draw(st.integers(0, a.shape[1] - 1))
    before = {(bi, bj): enc for bi, bj, enc, _ in t.blocks()}
    t.set(i, j, 42.5)
    a = a.copy()
    a[i, j] = 42.5
    np.testing.assert_array_equal(t.decode(), a)
    bi, bj, _, _ = t.layout.logical_to_block(i, j)
    changed = {(bi2, bj2) for bi2, bj2, enc, _ in t.blocks() if enc is not before[bi2, bj2]}
    assert changed == {(bi, bj)}


def test_selective_decode_touches_only_the_blocks_needed(rng, monkeypatch):
    t = RBETensor.from_array(arr(rng, 12, 8), "int8", (4, 4))
    seen = []
    codec_cls = type(t._grid[0][0][0].codec)
    orig_rows, orig_decode = codec_cls.decode_rows, codec_cls.decode

    def spy_rows(self, enc, start, stop):
        seen.append(id(enc))
        return orig_rows(self, enc, start, stop)

    def spy_decode(self, enc):
        seen.append(id(enc))
        return orig_decode(self, enc)

    monkeypatch.setattr(codec_cls, "decode_rows", spy_rows)
    monkeypatch.setattr(codec_cls, "decode", spy_decode)
    ids = {(bi, bj): id(enc) for bi, bj, enc, _ in t.blocks()}
    t.rows(5, 7)
    assert set(seen) == {ids[1, 0], ids[1, 1]}
    seen.clear()
    t.get(11, 0)
    assert seen == [ids[2, 0]]
    seen.clear()
    t.block(0, 1)
    assert set(seen) == {ids[0, 1]}


def test_set_on_transposed_and_nd_tensors(rng):
    a = arr(rng, 6, 2, 3)
    t = RBETensor.from_array(a, "raw", (4, 4))
    assert t.shape == (6, 2, 3) and t.get(5, 1, 2) == a[5, 1, 2]
    t.set(5, 1, 2, -3.0)
    a[5, 1, 2] = -3.0
    np.testing.assert_array_equal(t.decode(), a)
    tt = t.reshape(6, 6).T
    tt.set(0, 1, 7.0)
    assert tt.get(0, 1) == 7.0 and tt.T.get(1, 0) == 7.0 and t.get(1, 0, 0) == a[1, 0, 0]  # t unchanged


# ---- element-wise ops -------------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_add_mul_match_numpy(data):
    t, a = data.draw(tensors())
    u, b = data.draw(tensors(rows=a.shape[0], cols=a.shape[1], block=t.block_shape))
    s = data.draw(st.floats(-4, 4, allow_nan=False))
    np.testing.assert_array_equal((t + u).decode(), a + b)
    np.testing.assert_array_equal(t.mul(u).decode(), a * b)
    np.testing.assert_array_equal((t * s).decode(), a * np.float32(s))
    np.testing.assert_array_equal((s + t).decode(), a + np.float32(s))
    np.testing.assert_array_equal(t.T.add(u.T).decode(), (a + b).T)  # transposed blocks combine too


def test_results_reencoded_with_the_given_codec(rng):
    a, b = arr(rng, 16, 64), arr(rng, 16, 64)
    t, u = RBETensor.from_array(a, "int8", (8, 64)), RBETensor.from_array(b, "int8", (8, 64))
    s = t.add(u, codec={"id": "int4", "group_size": 32})
    assert {enc.codec.codec_id for *_, enc, _ in s.blocks()} == {"int4"}
    ref = t.decode() + u.decode()
    assert np.abs(s.decode() - ref).max() < np.abs(ref).max() / 7  # int4 error scale
    kept = t.mul(2.0)
    assert {enc.codec.codec_id for *_, enc, _ in kept.blocks()} == {"int8"}
    np.testing.assert_allclose(kept.decode(), 2 * t.decode(), atol=2 * np.abs(a).max() / 127)


def test_elementwise_bad_input():
    t = RBETensor.from_array(np.ones((4, 4), np.float32), "raw", (2, 2))
    with pytest.raises(ValueError, match="layouts differ"):
        t.add(RBETensor.from_array(np.ones((4, 4), np.float32), "raw", (4, 2)))
    with pytest.raises(TypeError, match="same layout or a real scalar"):
        t.mul("2")
    with pytest.raises(TypeError):
        t + np.ones((4, 4))  # noqa: B018 - dense arrays are not implicitly encoded
    with pytest.raises(InvalidWeightError):
        t.mul(float("nan"))


# ---- products ---------------------------------------------------------------------------------


@FAST
@given(tv=tensors(), k=st.integers(1, 5), seed=st.integers(0, 1000))
def test_matmul_matches_numpy(tv, k, seed):
    t, a = tv
    rng = np.random.default_rng(seed)
    x, y = arr(rng, a.shape[1], k), arr(rng, 3, a.shape[0])
    np.testing.assert_allclose(t.matmul(x), a @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t @ x[:, 0], a @ x[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y @ t, y @ a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t.T @ y.T, a.T @ y.T, rtol=1e-5, atol=1e-5)


def test_matmul_torch_operand_and_fused_path(rng, monkeypatch, backend):
    a = arr(rng, 20, 12)
    t = RBETensor.from_array(a, "int8", (8, 5))
    dense = t.decode()
    for name in ("decode", "_window", "_block_array"):  # the fused path never decodes blocks itself
        monkeypatch.setattr(RBETensor, name, lambda *a, **k: pytest.fail("decoded on the fused path"))
    x = torch.from_numpy(arr(rng, 12, 3))
    out = t.matmul(x, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == (20, 3)
    np.testing.assert_allclose(out.numpy(), dense @ x.numpy(), rtol=1e-4, atol=1e-4)
    xb = torch.from_numpy(arr(rng, 2, 4, 20))  # batched x @ t
    np.testing.assert_allclose((xb @ t).numpy(), xb.numpy() @ dense, rtol=1e-4, atol=1e-4)


def test_matmul_bad_input():
    t = RBETensor.from_array(np.ones((4, 6), np.float32), "raw", (2, 2))
    with pytest.raises(ValueError, match="expected 6"):
        t.matmul(np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="1-D or 2-D"):
        t.matmul(np.ones((2, 6, 2), np.float32))
    with pytest.raises(TypeError):
        t @ t  # noqa: B018


# ---- structure --------------------------------------------------------------------------------


@FAST
@given(tv=tensors(), data=st.data())
def test_transpose_slice_reshape_match_numpy(tv, data):
    t, a = tv
    np.testing.assert_array_equal(t.T.decode(), a.T)
    np.testing.assert_array_equal(t.T.T.decode(), a)
    assert t.T.T.block_shape == t.block_shape
    r0 = data.draw(st.integers(0, a.shape[0] - 1))
    r1 = data.draw(st.integers(r0 + 1, a.shape[0]))
    c0 = data.draw(st.integers(0, a.shape[1] - 1))
    c1 = data.draw(st.integers(c0 + 1, a.shape[1]))
    np.testing.assert_array_equal(t.slice(slice(r0, r1), slice(c0, c1)).decode(), a[r0:r1, c0:c1])
    np.testing.assert_array_equal(t.T.slice(slice(c0, c1), slice(r0, r1)).decode(), a.T[c0:c1, r0:r1])
    np.testing.assert_array_equal(t.reshape(-1).decode(), a.reshape(-1))
    np.testing.assert_array_equal(t.reshape(a.shape[0], 1, a.shape[1]).decode(), a.reshape(a.shape[0], 1, -1))


def test_structural_ops_share_blocks(rng):
    a = arr(rng, 10, 9)
    t = RBETensor.from_array(a, "int8", (4, 3))
    encs = {id(enc) for *_, enc, _ in t.blocks()}
    for view in (t.T, t.slice(slice(4, 10), slice(3, 9)), t.reshape(10, 3, 3),
                 RBETensor.concat([t.slice(slice(0, 8)), t.slice(slice(8, 10))])):
        assert {id(enc) for *_, enc, _ in view.blocks()} <= encs
    np.testing.assert_array_equal(t.slice(slice(4, 10), slice(3, 9)).decode(), t.decode()[4:, 3:])
    moved = t.reshape(9, 10)  # changes the matrix view: re-encoded
    assert {id(enc) for *_, enc, _ in moved.blocks()}.isdisjoint(encs)
    np.testing.assert_allclose(moved.decode(), t.decode().reshape(9, 10), atol=np.abs(a).max() / 100)


@FAST
@given(data=st.data())
def test_concat_matches_numpy(data):
    br, bc = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    cols = data.draw(st.integers(1, 9))
    parts = [data.draw(tensors(rows=br * data.draw(st.integers(1, 3)), cols=cols, block=(br, bc))) for _ in range(2)]
    parts.append(data.draw(tensors(rows=data.draw(st.integers(1, 7)), cols=cols, block=(br, bc))))
    out = RBETensor.concat([p for p, _ in parts], axis=0)
    np.testing.assert_array_equal(out.decode(), np.concatenate([a for _, a in parts]))
    side = RBETensor.concat([p.T for p, _ in parts], axis=1)
    np.testing.assert_array_equal(side.decode(), np.concatenate([a.T for _, a in parts], axis=1))


def test_structural_bad_input(rng):
    t = RBETensor.from_array(arr(rng, 6, 6), "raw", (4, 4))
    with pytest.raises(ValueError, match="whole blocks"):
        RBETensor.concat([t, t])
    with pytest.raises(ValueError, match="block shapes differ"):
        RBETensor.concat([t, RBETensor.from_array(arr(rng, 6, 6), "raw", (2, 2))])
    with pytest.raises(ValueError, match="differ off axis"):
        RBETensor.concat([RBETensor.from_array(arr(rng, 8, 6), "raw", (4, 4)), t.slice(cols=slice(0, 4))])
    with pytest.raises(TypeError):
        RBETensor.concat([])
    with pytest.raises(ValueError, match="2-D"):
        t.reshape(6, 3, 2).T  # noqa: B018
    with pytest.raises(ValueError, match="cannot reshape"):
        t.reshape(5, -1)
    with pytest.raises(ValueError, match="step must be 1"):
        t.slice(slice(0, 6, 2))
    with pytest.raises(ValueError, match="selects nothing"):
        t.slice(slice(3, 3))
    with pytest.raises(IndexError):
        t.get(6, 0)
    with pytest.raises(IndexError, match="expected 2 indices"):
        t.get(1)
    with pytest.raises(IndexError):
        t.rows(2, 9)


def test_construction_bad_input(rng):
    enc = rbe_core.get_codec("raw").encode(arr(rng, 4, 4))
    small = rbe_core.get_codec("raw").encode(arr(rng, 3, 4))
    with pytest.raises(ValueError, match="rectangular"):
        RBETensor([[enc, enc], [enc]])
    with pytest.raises(TypeError, match="expected Encoded"):
        RBETensor([[enc, np.ones((4, 4))]])
    with pytest.raises(ValueError, match="layout"):
        RBETensor([[small], [enc]])  # a short block that is not the last
    with pytest.raises(ValueError, match="matrix view"):
        RBETensor([[enc]], shape=(8, 2))
    with pytest.raises(InvalidWeightError):
        RBETensor.from_array(np.full((2, 2), np.nan, np.float32), "int8", (1, 1))
    with pytest.raises(ValueError, match="positive integer"):
        RBETensor.from_array(arr(rng, 2, 2), "int8", (0, 1))
    with pytest.raises(rbe_core.UnknownCodecError):
        RBETensor.from_array(arr(rng, 2, 2), "nope", (1, 1))


def test_from_encoded_any_codec(rng):
    w = arr(rng, 6, 4, 8)
    enc = rbe_core.get_codec({"id": "int4", "group_size": 16}).encode(w)
    t = RBETensor.from_encoded(enc)
    assert t.shape == (6, 4, 8) and t.grid == (1, 1)
    np.testing.assert_array_equal(t.decode(), enc.decode())
    np.testing.assert_array_equal(t.rows(2, 4), enc.decode_rows(2, 4))
    x = arr(rng, 32, 2)
    np.testing.assert_allclose(t.matmul(x), enc.decode().reshape(6, 32) @ x, rtol=1e-4, atol=1e-4)
    assert t.bits_per_weight == pytest.approx(enc.bits_per_weight)


# ---- files ------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, rng):
    t = RBETensor.from_array(arr(rng, 10, 9), "int8", (4, 4))
    tensors = {"w": t, "wt": t.T, "nd": t.reshape(10, 3, 3)}
    path = rbe_core.tensor.save_tensors(tmp_path / "t.rbe", tensors, metadata={"note": "x"})
    f = rbe_core.open(path)
    assert "w[2,1]" in f and f.metadata["note"] == "x"
    assert f.metadata[LAYOUT_KEY]["wt"]["transposed"] == [[i, j] for i in range(3) for j in range(3)]
    back = rbe_core.tensor.load_tensors(path)
    for name, orig in tensors.items():
        assert back[name].shape == orig.shape and back[name].block_shape == orig.block_shape
        np.testing.assert_array_equal(back[name].decode(), orig.decode())
    one = tmp_path / "one.rbe"
    t.save(one)
    np.testing.assert_array_equal(RBETensor.load(one).decode(), t.decode())
    with pytest.raises(ValueError, match="pass name="):
        RBETensor.load(path)
    with pytest.raises(KeyError, match="no RBETensor 'zz'"):
        RBETensor.load(path, "zz")


def test_save_load_bad_input(tmp_path, rng):
    t = RBETensor.from_array(arr(rng, 4, 4), "raw", (2, 2))
    with pytest.raises(ValueError, match="reserved"):
        t.save(tmp_path / "a.rbe", metadata={LAYOUT_KEY: 1})
    with pytest.raises(TypeError, match="expected an RBETensor"):
        rbe_core.tensor.save_tensors(tmp_path / "a.rbe", {"x": np.ones(2)})
    assert list(tmp_path.iterdir()) == []
    rbe_core.save(tmp_path / "plain.rbe", {"x": np.ones(2, np.float32)})
    with pytest.raises(RBEFormatError, match="no RBETensor layout"):
        RBETensor.load(tmp_path / "plain.rbe")
    meta = {LAYOUT_KEY: {"t": {"shape": [4, 4], "block_shape": [2, 2], "grid": [2, 3], "transposed": []}}}
    blocks = {f"t[{i},{j}]": enc for i, j, enc, _ in t.blocks()}
    rbe_core.save(tmp_path / "bad.rbe", blocks, metadata=json.loads(json.dumps(meta)))
    with pytest.raises(RBEFormatError, match="missing block"):
        RBETensor.load(tmp_path / "bad.rbe")
