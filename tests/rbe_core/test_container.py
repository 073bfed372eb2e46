import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rbe_core
from rbe_core.errors import ChecksumError, RBEError, RBEFormatError, UnknownCodecError


def sample_tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "layer.weight": rbe_core.get_codec("int8").encode(rng.standard_normal((24, 40)).astype(np.float32), source="layer.weight"),
        "layer.bias": rng.standard_normal(24).astype(np.float32),
    }


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.rbe"
    rbe_core.save(path, sample_tensors(), metadata={"model": {"name": "t"}})
    return path


def read_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(path, header, body):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def test_round_trip(good_file):
    original = sample_tensors()
    f = rbe_core.open(good_file)
    assert set(f) == {"layer.weight", "layer.bias"}
    enc = f["layer.weight"]
    assert isinstance(enc, rbe_core.Encoded)
    assert enc.codec.codec_id == "int8" and enc.shape == (24, 40) and enc.source == "layer.weight"
    np.testing.assert_array_equal(enc.decode(), original["layer.weight"].decode())
    np.testing.assert_array_equal(f["layer.bias"].decode(), original["layer.bias"])
    assert f.metadata == {"model": {"name": "t"}}
    assert 8 < enc.bits_per_weight < 8 + 32 / 40 + 8 * 400 / 960  # payload + scales + its header
    assert f.headers["layer.weight"]["plugin"] == "rbe"


def test_bits_per_weight_counts_everything(good_file):
    enc = rbe_core.open(good_file)["layer.weight"]
    header_bytes = len(json.dumps(enc.header()))
    assert enc.nbytes == 24 * 40 + 24 * 4 + header_bytes
    assert enc.bits_per_weight == pytest.approx(8 * enc.nbytes / (24 * 40))


def test_torch_and_bfloat16_input_round_trip(tmp_path):
    import torch

    w = torch.randn(8, 16, dtype=torch.bfloat16)
    enc = rbe_core.get_codec("int8").encode(w)
    assert enc.dtype == "bfloat16"
    rbe_core.save(tmp_path / "t.rbe", {"w": enc})
    back = rbe_core.open(tmp_path / "t.rbe")["w"]
    assert back.dtype == "bfloat16"
    np.testing.assert_allclose(back.decode(), w.float().numpy(), atol=float(w.abs().max()) / 127)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    def explode(src_fd, dst, offset, length):
        dst.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(rbe_core.container, "_copy_range", explode)
    with pytest.raises(KeyboardInterrupt):
        rbe_core.save(tmp_path / "out.rbe", sample_tensors())
    assert os.listdir(tmp_path) == []


def test_save_replaces_existing_file_whole(good_file, rng):
    rbe_core.save(good_file, {"only": rng.standard_normal(3).astype(np.float32)})
    assert list(rbe_core.open(good_file)) == ["only"]


def test_save_rejects_bad_values(tmp_path):
    with pytest.raises(TypeError):
        rbe_core.save(tmp_path / "x.rbe", {"w": [1, 2, 3]})
    with pytest.raises(ValueError):
        rbe_core.save(tmp_path / "x.rbe", {"": np.ones(2, dtype=np.float32)})
    assert not (tmp_path / "x.rbe").exists()


def test_truncated_file(good_file):
    data = good_file.read_bytes()
    for cut in (0, 4, 8, 50, len(data) // 2, len(data) - 1):
        good_file.write_bytes(data[:cut])
        with pytest.raises(RBEFormatError):
            f = rbe_core.open(good_file)
            for name in f:
                f[name].decode()


def test_flipped_payload_byte_fails_checksum(good_file):
    header, body = read_header(good_file)
    body = bytearray(body)
    body[len(body) // 2] ^= 0xFF
    write_header(good_file, header, bytes(body))
    f = rbe_core.open(good_file)
    with pytest.raises(ChecksumError):
        for name in f:
            f[name]
    assert "ChecksumError" in f.status("layer.weight") or "ChecksumError" in f.status("layer.bias")


def test_rewritten_shape_is_detected(good_file):
    header, body = read_header(good_file)
    tensors = json.loads(header["__metadata__"]["rbe.tensors"])
    tensors["layer.weight"]["shape"] = [40, 24]
    header["__metadata__"]["rbe.tensors"] = json.dumps(tensors)
    write_header(good_file, header, body)
    with pytest.raises(ChecksumError):
        rbe_core.open(good_file)["layer.weight"]


def test_rewritten_shape_with_matching_checksum_fails_validation(good_file):
    header, body = read_header(good_file)
    tensors = json.loads(header["__metadata__"]["rbe.tensors"])
    h = tensors["layer.weight"]
    h["shape"] = [40, 24]
    f = rbe_core.open(good_file)
    payload = {k: f._file.get_tensor(f"layer.weight/{k}") for k in h["fields"]}
    h["sha256"] = rbe_core.abc.payload_digest(h["codec"], tuple(h["shape"]), h["dtype"], payload)
    header["__metadata__"]["rbe.tensors"] = json.dumps(tensors)
    write_header(good_file, header, body)
    with pytest.raises(RBEFormatError, match="expected"):
        rbe_core.open(good_file)["layer.weight"]


def test_unknown_codec_id_names_the_plugin(good_file):
    header, body = read_header(good_file)
    tensors = json.loads(header["__metadata__"]["rbe.tensors"])
    tensors["layer.weight"]["codec"] = {"id": "fancy9"}
    tensors["layer.weight"]["plugin"] = "rbe-codec-fancy"
    header["__metadata__"]["rbe.tensors"] = json.dumps(tensors)
    write_header(good_file, header, body)
    with pytest.raises(UnknownCodecError, match="rbe-codec-fancy"):
        rbe_core.open(good_file)["layer.weight"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.pop("rbe.format"),
        lambda m: m.update({"rbe.format": "99"}),
        lambda m: m.update({"rbe.tensors": "{not json"}),
        lambda m: m.update({"rbe.tensors": "[]"}),
        lambda m: m.update({"rbe.metadata": "3"}),
        lambda m: m.update({"rbe.tensors": json.dumps({"layer.weight": {"codec": {"id": "int8"}}})}),
    ],
)
def test_rewritten_metadata_is_a_format_error(good_file, mutate):
    header, body = read_header(good_file)
    mutate(header["__metadata__"])
    write_header(good_file, header, body)
    with pytest.raises(RBEFormatError):
        rbe_core.open(good_file)


def test_not_an_rbe_file(tmp_path):
    import safetensors.numpy

    safetensors.numpy.save_file({"a": np.ones(2, dtype=np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(RBEFormatError, match="rbe.format"):
        rbe_core.open(tmp_path / "plain.safetensors")
    (tmp_path / "text.rbe").write_text("hello world, definitely not safetensors")
    with pytest.raises(RBEFormatError):
        rbe_core.open(tmp_path / "text.rbe")


def _open_and_decode_all(path):
    f = rbe_core.open(path)
    for name in f:
        f[name].decode()


_GOOD = {}


def _good_bytes(tmp_path_factory):
    if "bytes" not in _GOOD:
        path = tmp_path_factory.mktemp("good") / "g.rbe"
        rbe_core.save(path, sample_tensors(7), metadata={"k": "v"})
        _GOOD["bytes"] = path.read_bytes()
    return _GOOD["bytes"]


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("splice"), st.integers(0, 10_000), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("garbage"), st.binary(max_size=256)),
)


def apply(data: bytes, op) -> bytes:
    kind = op[0]
    if not data and kind in ("flip", "splice"):
        return data
    if kind == "truncate":
        return data[: op[1] % (len(data) + 1)]
    if kind == "flip":
        i = op[1] % len(data)
        return data[:i] + bytes([data[i] ^ op[2]]) + data[i + 1 :]
    if kind == "splice":
        i = op[1] % len(data)
        return data[:i] + op[2] + data[i + len(op[2]) :]
    if kind == "length":
        return struct.pack("<Q", op[1]) + data[8:]
    return op[1]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(mutation, min_size=1, max_size=3))
def test_hostile_files_only_raise_typed_errors(tmp_path_factory, ops):
    data = _good_bytes(tmp_path_factory)
    for op in ops:
        data = apply(data, op)
    path = tmp_path_factory.getbasetemp() / "hostile.rbe"
    path.write_bytes(data)
    try:
        _open_and_decode_all(path)
    except RBEError:
        pass


# --- streaming writer ----------------------------------------------------------------------------


def _parsed(path):
    header, body = read_header(path)
    meta = header.pop("__metadata__")
    return meta, header, body


def test_writer_round_trip_with_metadata_given_at_close(tmp_path):
    tensors = sample_tensors(3)
    path = tmp_path / "w.rbe"
    with rbe_core.container.Writer(path, {"early": 1}) as w:
        for name, value in tensors.items():
            w.add(name, value)
        assert len(w) == 2 and "layer.bias" in w and not path.exists()
        assert w.close({"late": {"x": [1, 2]}}) == path
    assert w.closed and os.listdir(tmp_path) == ["w.rbe"]
    f = rbe_core.open(path)
    assert f.metadata == {"late": {"x": [1, 2]}}
    for name, value in tensors.items():
        np.testing.assert_array_equal(f[name].decode(), rbe_core.container._as_encoded(name, value).decode())


def test_writer_metadata_attribute_is_read_at_close(tmp_path):
    path = tmp_path / "w.rbe"
    with rbe_core.container.Writer(path) as w:
        w.add("b", np.ones(3, np.float32))
        w.metadata["config"] = {"d": 4}
    assert rbe_core.open(path).metadata == {"config": {"d": 4}}


def test_writer_output_matches_safetensors_own_writer(tmp_path):
    """Same header entries in the same order and the same data bytes as safetensors.numpy.save_file
    (which randomises the order of __metadata__ keys, so those are compared as a dict)."""
    import safetensors
    import safetensors.numpy

    rng = np.random.default_rng(5)
    payload = {"a": rng.standard_normal(7), "b": rng.integers(-9, 9, (3, 5)).astype(np.int8),
               "c": rng.standard_normal((2, 3)).astype(np.float16), "d": np.arange(5, dtype=np.uint8),
               "e": np.array([True, False]), "f": rng.standard_normal(3).astype(np.float32),
               "g": np.arange(4, dtype=np.int64), "h": np.arange(3, dtype=">i4")}
    codec = rbe_core.get_codec("raw")
    path = tmp_path / "ours.rbe"
    with rbe_core.container.Writer(path, {"k": "v"}) as w:
        for name in reversed(sorted(payload)):  # arrival order must not matter
            w.add(name, rbe_core.Encoded(codec, (1,), {"data": payload[name]}))
        w.close(check=lambda tmp: safetensors.safe_open(str(tmp), framework="numpy"))
    meta, entries, body = _parsed(path)
    ref = tmp_path / "ref.safetensors"
    safetensors.numpy.save_file({f"{n}/data": a for n, a in payload.items()}, str(ref), metadata=meta)
    ref_meta, ref_entries, ref_body = _parsed(ref)
    assert meta == ref_meta
    assert list(entries.items()) == list(ref_entries.items())
    assert body == ref_body
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
    with safetensors.safe_open(str(path), framework="numpy") as f:
        for name, arr in payload.items():
            np.testing.assert_array_equal(f.get_tensor(f"{name}/data"), arr)


def test_save_output_loads_with_safe_open(good_file):
    import safetensors

    with safetensors.safe_open(str(good_file), framework="numpy") as f:
        assert set(f.keys()) == {"layer.weight/q", "layer.weight/scale", "layer.bias/data"}
        assert json.loads(f.metadata()["rbe.metadata"]) == {"model": {"name": "t"}}


def test_writer_rejects_duplicates_and_bad_names(tmp_path):
    with rbe_core.container.Writer(tmp_path / "w.rbe") as w:
        w.add("x", np.ones(2, np.float32))
        with pytest.raises(ValueError, match="duplicate tensor name 'x'"):
            w.add("x", np.ones(2, np.float32))
        with pytest.raises(ValueError, match="non-empty"):
            w.add("", np.ones(2, np.float32))
        with pytest.raises(TypeError, match="Encoded value or an array"):
            w.add("y", [1.0])
        w.add("z", np.zeros(1, np.float32))  # still usable after rejected input
    assert set(rbe_core.open(tmp_path / "w.rbe")) == {"x", "z"}


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_writer_interrupted_leaves_nothing(tmp_path, exc):
    (tmp_path / "w.rbe").write_bytes(b"old")  # an existing file is kept as it was
    with pytest.raises(exc):
        with rbe_core.container.Writer(tmp_path / "w.rbe") as w:
            w.add("a", np.ones(1000, np.float32))
            assert len(os.listdir(tmp_path)) == 2  # the old file and the hidden spill file
            raise exc
    assert os.listdir(tmp_path) == ["w.rbe"] and (tmp_path / "w.rbe").read_bytes() == b"old"
    with pytest.raises(ValueError, match="closed"):
        w.add("b", np.ones(1, np.float32))


def test_writer_failed_check_or_bad_metadata_writes_nothing(tmp_path):
    def reject(tmp):
        assert rbe_core.open(tmp)["a"].shape == (3,)  # the temporary file is complete
        raise RuntimeError("verification failed")

    with pytest.raises(RuntimeError, match="verification"):
        with rbe_core.container.Writer(tmp_path / "w.rbe") as w:
            w.add("a", np.ones(3, np.float32))
            w.close(check=reject)
    with pytest.raises(TypeError):
        rbe_core.save(tmp_path / "w.rbe", {"a": np.ones(3, np.float32)}, metadata={"x": object()})
    assert os.listdir(tmp_path) == []


def test_abandoned_writer_cleans_up(tmp_path):
    import gc

    w = rbe_core.container.Writer(tmp_path / "w.rbe")
    w.add("a", np.ones(3, np.float32))
    del w
    gc.collect()
    assert os.listdir(tmp_path) == []
