import json
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

import rbe_core
from rbe_core.errors import BackendUnavailableError, RBEFormatError, UnknownCodecError


@pytest.fixture
def fresh_registry(monkeypatch):
    """Rebuild the registry for a test and restore the default one afterwards."""
    yield rbe_core.reload_plugins
    monkeypatch.undo()
    rbe_core.reload_plugins()


def make_dist(root, dist, module, body, entry_name=None):
    """A plugin on sys.path without installing it: a module plus a hand-written dist-info."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[rbe]\n{entry_name or module} = {module}\n")


CODEC_BODY = """
    import attrs
    from rbe_core import hookimpl
    from rbe_plugins.int8 import Int8Codec

    @attrs.define(frozen=True)
    class Shadow(Int8Codec):
        codec_id = "{cid}"

    @hookimpl
    def rbe_register_codecs(register):
        register(Shadow)
"""


def test_builtins_come_through_entry_points():
    reg = rbe_core.registry()
    assert {"int8", "raw"} <= set(rbe_core.list_codecs())
    assert reg.entries["codecs"]["int8"].dist == "rbe"
    assert reg.entries["codecs"]["int8"].plugin == "int8"
    assert reg.entries["backends"]["numpy"].dist == "rbe"


def test_get_codec_by_id_and_config():
    codec = rbe_core.get_codec("int8")
    assert codec.get_config() == {"id": "int8"}
    assert rbe_core.get_codec(codec.get_config()) == codec
    assert json.loads(json.dumps(rbe_core.get_codec("raw").get_config())) == {"id": "raw", "storage": "auto"}


def test_unknown_codec_names_the_plugin():
    with pytest.raises(UnknownCodecError) as info:
        rbe_core.get_codec({"id": "nope"}, plugin="rbe-codec-nope")
    assert "nope" in str(info.value) and "pip install rbe-codec-nope" in str(info.value)
    assert "int8" in str(info.value)


@pytest.mark.parametrize("config", [{"id": "raw", "storage": "int3"}, {"id": "int8", "bogus": 1}, {"no": "id"}, {"id": 5}])
def test_bad_config_is_a_format_error(config):
    with pytest.raises(RBEFormatError):
        rbe_core.get_codec(config)


def test_fake_dist_info_plugin_is_discovered(tmp_path, monkeypatch, fresh_registry):
    make_dist(tmp_path, "rbe-codec-shadow", "rbe_shadow_plugin", CODEC_BODY.format(cid="shadow8"))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = fresh_registry()
    entry = reg.entries["codecs"]["shadow8"]
    assert entry.dist == "rbe-codec-shadow"
    assert rbe_core.get_codec("shadow8").codec_id == "shadow8"


def test_broken_plugin_is_reported_and_others_survive(tmp_path, monkeypatch, fresh_registry):
    make_dist(tmp_path, "rbe-broken", "rbe_broken_plugin", "raise ImportError('missing libfoo')\n")
    make_dist(tmp_path, "rbe-badhook", "rbe_badhook_plugin", """
        from rbe_core import hookimpl

        @hookimpl
        def rbe_register_codecs(register):
            register(object())
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = fresh_registry()
    failed = {p.dist: p.error for p in reg.failures}
    assert "missing libfoo" in failed["rbe-broken"]
    assert "rbe-badhook" in failed
    assert "int8" in rbe_core.list_codecs()


def test_duplicate_codec_id_keeps_the_first(tmp_path, monkeypatch, fresh_registry):
    make_dist(tmp_path, "rbe-dup", "zz_dup_plugin", CODEC_BODY.format(cid="int8"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="already provided"):
        reg = fresh_registry()
    assert reg.entries["codecs"]["int8"].dist == "rbe"


def test_disable_by_environment(monkeypatch, fresh_registry):
    monkeypatch.setenv("RBE_DISABLE_PLUGINS", "int8")
    reg = fresh_registry()
    assert "int8" not in rbe_core.list_codecs()
    assert [p.plugin for p in reg.disabled] == ["int8"]
    with pytest.raises(UnknownCodecError):
        rbe_core.get_codec("int8")


def test_list_backends_reports_reasons():
    rows = {r["name"]: r for r in rbe_core.list_backends()}
    assert rows["numpy"]["available"] and rows["numpy"]["reason"] == ""
    for row in rows.values():
        assert row["available"] or row["reason"]


def test_unknown_and_unavailable_backends_are_errors(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'"):
        rbe_core.get_backend("nope")
    unavailable = [r for r in rbe_core.list_backends() if not r["available"]]
    for row in unavailable:
        with pytest.raises(BackendUnavailableError, match=row["name"]):
            rbe_core.get_backend(row["name"])


def test_default_backend_follows_environment(monkeypatch):
    monkeypatch.setenv("RBE_BACKEND", "numpy")
    assert rbe_core.get_backend().name == "numpy"
    monkeypatch.delenv("RBE_BACKEND")
    best = max((r for r in rbe_core.list_backends() if r["available"]), key=lambda r: r["priority"])
    assert rbe_core.get_backend().name == best["name"]


def test_plugins_are_namespaced_when_installed():
    import rbe_backends.numpy
    import rbe_plugins.int8

    assert rbe_plugins.int8.Int8Codec.codec_id == "int8"
    assert rbe_backends.numpy.NumpyBackend.name == "numpy"
    assert "plugins" not in sys.modules and "backends" not in sys.modules


KERNEL_BODY = """
    import attrs
    import numpy as np
    from rbe_core import hookimpl
    from rbe_core.abc import Kernel
    from rbe_core.arrays import like, to_numpy_f32
    from rbe_plugins.hybrid import HybridCodec

    @attrs.define(frozen=True)
    class Trellis(HybridCodec):
        codec_id = "trellis-demo"

    class TrellisKernel(Kernel):
        codec_id = "trellis-demo"
        backends = ("numpy", "torch", "cffi")
        calls = []

        def _w(self, encoded):
            return encoded.codec.decode(encoded).reshape(encoded.matrix_shape)

        def linear(self, x, encoded, bias=None):
            self.calls.append("linear")
            out = to_numpy_f32(x) @ self._w(encoded).T
            return like(out if bias is None else out + to_numpy_f32(bias), x)

        def linear_grad_input(self, grad_out, encoded):
            self.calls.append("grad")
            return like(to_numpy_f32(grad_out) @ self._w(encoded), grad_out)

    @hookimpl
    def rbe_register_codecs(register):
        register(Trellis)

    @hookimpl
    def rbe_register_kernels(register):
        register(TrellisKernel)
"""


def test_plugin_kernel_replaces_the_generic_path(tmp_path, monkeypatch, fresh_registry, rng):
    """A plugin's own kernel runs its codec on every backend it names; the generic path (the
    backends' only other path, which this codec lacks) is never called; ``rbe plugins`` lists it."""
    import torch

    from rbe_core.cli import main
    from rbe_core.native import generic

    make_dist(tmp_path, "rbe-trellis", "rbe_trellis_demo", KERNEL_BODY)
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh_registry()
    enc = rbe_core.get_codec("trellis-demo").encode(rng.standard_normal((24, 64)).astype(np.float32))
    w = enc.decode().reshape(24, 64)

    def refuse(*_a, **_k):
        raise AssertionError("the generic path ran")

    monkeypatch.setattr(generic, "decoded_chunks", refuse)
    kernel_cls = rbe_core.registry().entries["kernels"]["trellis-demo@torch"].obj
    for name in ("numpy", "torch") + (("cffi",) if rbe_core.get_backend("cffi").availability()[0] else ()):
        backend = rbe_core.get_backend(name)
        assert backend.path(enc) == "kernel" and backend.supports(rbe_core.get_codec("trellis-demo"))
        x, g = torch.randn(3, 64), torch.randn(3, 24)
        y, gi = backend.linear(x, enc), backend.linear_grad_input(g, enc)
        assert isinstance(y, torch.Tensor) and torch.allclose(y, x @ torch.from_numpy(w).T, atol=1e-5)
        assert torch.allclose(gi, g @ torch.from_numpy(w), atol=1e-5)
    assert kernel_cls.calls.count("linear") >= 2 and kernel_cls.calls.count("grad") >= 2
    r = CliRunner().invoke(main, ["plugins", "--json"])
    out = json.loads(r.output)
    assert {k["name"] for k in out["kernels"]} >= {"trellis-demo@torch", "trellis-demo@numpy"}
    row = next(c for c in out["codecs"] if c["name"] == "trellis-demo")
    assert row["paths"]["torch"] == "kernel" and row["dist"] == "rbe-trellis"
    assert next(c for c in out["codecs"] if c["name"] == "hybrid")["paths"]["torch"] == "generic"
