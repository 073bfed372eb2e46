"""``rbe_core.compression.calibration``: measured output damage, bit allocation under a budget."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # --import-mode=importlib: make the helpers importable
from _model_helpers import tiny_bert, tiny_llama  # noqa: E402

import rbe_core  # noqa: E402
from rbe_core.compression.calibration import (  # noqa: E402
    CALIBRATION_BUDGET,
    Gram,
    _damage,
    _scored_output,
    allocate,
    allocate_settings,
    asymmetric_target,
    batches,
    default_tokens,
    encode_calibrated,
    error_sample,
    float_grams,
    output_damage,
    sequential_encode,
    source_model,
    stored_bytes,
    weighted_error,
)
from rbe_core.models.common import CausalLM  # noqa: E402
from rbe_core.models.sources import open_source  # noqa: E402
from rbe_core.registry import get_codec  # noqa: E402

torch = pytest.importorskip("torch")
TEXT = ("Compressed weights are decoded inside the matrix multiply. The quick brown fox jumps over the lazy dog. "
        "A third sentence follows the second one here.\n\nAnother paragraph starts with these words.") * 6


@pytest.fixture(scope="module", params=["llama", "bert"])
def dense(request, tmp_path_factory):
    """(rbe's dense model, its recording factory, calibration batches) of a tiny random model."""
    d = tmp_path_factory.mktemp(request.param)
    (tiny_llama(num_hidden_layers=3) if request.param == "llama" else tiny_bert()).save_pretrained(d)
    model, factory = source_model(open_source(d))
    return model, factory, batches(model, TEXT, max_tokens=256, window=32, batch=2)


def _linears(factory):
    return [n for n in factory.linears if n not in factory.embeddings]


def _noisy(factory, scale=0.05):
    def replace(n):
        w = factory.linears[n][0].weight.detach().numpy()
        return w + scale * np.random.default_rng(len(n)).standard_normal(w.shape).astype(np.float32) * w.std()
    return replace


def test_unchanged_weights_do_no_damage(dense):
    model, factory, data = dense
    names = _linears(factory)
    damage, power = output_damage(model, factory, data, names, lambda n: factory.linears[n][0].weight.detach().numpy())
    assert set(damage) == set(names) and max(damage.values()) < 1e-6
    assert all(p.shape == (factory.linears[n][0].weight.shape[1],) and (p > 0).all() for n, p in power.items())


def test_skipping_blocks_measures_what_the_whole_model_measures(dense):
    """The damage from cached block inputs equals a full forward pass with the weight replaced."""
    model, factory, data = dense
    last = [n for n in _linears(factory) if ".1." in n or "layers.2." in n][-1]  # a weight in a later block
    replace = _noisy(factory)
    damage, _ = output_damage(model, factory, data, [last], replace, head_stride=1)
    layer = factory.linears[last][0]
    with torch.no_grad():
        refs = [_scored_output(model, model(*a), m) for a, m in data]
        saved = layer.weight.detach().clone()
        layer.weight.copy_(torch.from_numpy(replace(last)))
        full = np.mean([_damage(model, r, _scored_output(model, model(*a), m)) for (a, m), r in zip(data, refs, strict=True)])
        layer.weight.copy_(saved)
    assert damage[last] > 0 and damage[last] == pytest.approx(full, rel=1e-4)
    assert torch.equal(layer.weight, saved)  # the model is left as it was


def test_damage_grows_with_the_perturbation(dense):
    model, factory, data = dense
    names = [n for n in _linears(factory) if not any(k in n for k in ("q_proj", "k_proj", "query", "key"))][:3]
    small, _ = output_damage(model, factory, data, names, _noisy(factory, 0.02))
    large, _ = output_damage(model, factory, data, names, _noisy(factory, 0.2))
    assert all(large[n] > 4 * small[n] > 0 for n in names)


def test_weighted_error_is_the_layer_output_error_for_white_inputs():
    rng = np.random.default_rng(0)
    delta = rng.standard_normal((8, 5))
    d = rng.uniform(0.5, 2.0, 5)
    expect = float(np.sum(delta**2 * d[None, :]))
    assert weighted_error(delta, d, False) == pytest.approx(expect)
    assert weighted_error(delta.T, d, True) == pytest.approx(expect)


@pytest.mark.parametrize("rows", [1, 7, 256, 300, 2048, 49152])
def test_error_sample_spans_the_rows(rows):
    s = error_sample(rows)
    assert s[0] == 0 and s[-1] == rows - 1 and np.all(np.diff(s) > 0)
    assert len(s) == min(rows, max(256, rows // 8))


@pytest.mark.parametrize("config", [{"id": "hadamard", "bits": 3}, {"id": "int4"}, "int8", {"id": "packed64"}, "hybrid"])
@pytest.mark.parametrize("shape", [(5, 64), (300, 96), (1000, 576)])
def test_stored_bytes_is_what_encoding_stores(config, shape):
    codec = get_codec(config)
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if config == "hybrid":  # what it stores depends on the values: measured on zeros, as before sampling
        w = np.zeros(shape, dtype=np.float32)
    assert stored_bytes(codec, shape) == codec.encode(w).nbytes


def test_allocate_gives_the_bits_to_the_sensitive_tensor():
    costs = {"a": [3.0, 4.0, 5.0], "b": [3.0, 4.0, 5.0]}
    errors = {"a": [100.0, 25.0, 6.0], "b": [1.0, 0.25, 0.06]}
    assert allocate(costs, errors, 6.0) == {"a": 0, "b": 0}
    assert allocate(costs, errors, 7.0) == {"a": 1, "b": 0}
    assert allocate(costs, errors, 8.0) == {"a": 2, "b": 0}
    assert allocate(costs, errors, 100.0) == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="budget"):
        allocate(costs, errors, 5.0)


@pytest.mark.parametrize("target", [4.0, 5.0])  # tiny matrices: headers cost ~1 bit/weight
def test_allocate_settings_meets_the_budget_and_follows_damage(dense, target):
    model, factory, data = dense
    names = _linears(factory)
    settings = [get_codec({"id": "hadamard", "bits": b}) for b in (8, 6, 5, 4, 3, 2)]
    pick = allocate_settings(model, factory, data, names, settings, target)
    weights = sum(factory.linears[n][0].weight.numel() for n in names)
    stored = sum(8 * c.encode(factory.linears[n][0].weight.detach().numpy()).nbytes for n, c in pick.items())
    assert set(pick) == set(names)
    assert stored / weights <= target + 1e-9
    assert len({c.bits for c in pick.values()}) > 1  # tiny random models still differ per tensor


def test_a_trellis_budget_picks_group_sizes_that_fit_the_widths(dense):
    """Trellis settings come at 1, 2 and 4 times the codec's groups: the budget takes larger
    groups (fewer step bits) where a width holds them whole, never ones that would pad it
    (the tiny models' inputs are 64 and 96 wide: groups of 64 would pad the 96)."""
    model, factory, data = dense
    names = _linears(factory)
    settings = get_codec({"id": "trellis", "group_size": 16}).bit_settings()
    assert {c.group_size for c in settings} == {16, 32, 64}
    pick = allocate_settings(model, factory, data, names, settings, 4.0)
    widths = {n: factory.linears[n][0].weight.shape[1] for n in names}
    assert all(widths[n] % c.group_size == 0 for n, c in pick.items())
    assert any(c.group_size > 16 for c in pick.values())


def test_default_tokens_grow_for_codecs_that_ask_within_the_budget(dense):
    """Causal LMs calibrate on 4096 tokens unless a codec asks for more (trellis: 16384), as far as
    the tokens × weights budget goes; encoders on 16384 whatever the codecs."""
    model, _, _ = dense
    trellis, hadamard = get_codec({"id": "trellis"}), get_codec({"id": "hadamard"})
    if not isinstance(model, CausalLM):
        assert default_tokens(model, 10**10, [hadamard, trellis]) == 16384
        return
    assert default_tokens(model, 10**6, [hadamard]) == 4096
    assert default_tokens(model, 10**6, [hadamard, trellis]) == 16384
    assert default_tokens(model, CALIBRATION_BUDGET // 8192, [trellis]) == 8192
    assert default_tokens(model, 10**10, [trellis]) == 4096


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_target_bpw_conversion_is_within_budget(kind, tmp_path):
    """Within the budget, on the flagship scalar grid for causal LMs and on trellis codes for
    encoders (convert.ENCODER_CODEC); a codec given chooses the settings for both."""
    (tiny_llama(num_hidden_layers=2) if kind == "llama" else tiny_bert()).save_pretrained(tmp_path / "hf")
    for codec, family in [(None, "hadamard" if kind == "llama" else "trellis"), ("hadamard", "hadamard")]:
        out = rbe_core.compress_model(tmp_path / "hf", tmp_path / "m.rbe", codec=codec, target_bpw=4.5, progress=False,
                                      calibration_tokens=256)
        f = rbe_core.open(out)
        linear = [n for n in f if f.headers[n]["codec"]["id"] != "raw" and ".layer" in n]  # the blocks' Linears
        assert {f.headers[n]["codec"]["id"] for n in linear} == {family}, codec
        assert 8 * sum(f[n].nbytes for n in linear) / sum(f[n].numel for n in linear) <= 4.5


def test_asymmetric_target_gives_the_weight_back_without_drift_and_undoes_drift():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 16))
    w = rng.standard_normal((8, 16)).astype(np.float32)
    assert np.allclose(asymmetric_target(w, Gram(x.T @ x, 512, x.T @ x)), w, atol=1e-6)
    drifted = x @ (np.eye(16) + 0.2 * rng.standard_normal((16, 16)))  # the compressed model's inputs, distorted
    adjusted = asymmetric_target(w, Gram(drifted.T @ drifted, 512, drifted.T @ x), ridge=0.01)
    target = x @ w.T
    assert np.linalg.norm(drifted @ adjusted.T - target) < 0.25 * np.linalg.norm(drifted @ w.T - target)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_sequential_encode_pairs_compressed_and_float_inputs(kind, tmp_path):
    """Asymmetric calibration: every block stage's Gram carries Σ x̃ᵀx; the very first stage sees
    no compressed layer yet, so there x̃ = x exactly; later stages have drifted."""
    (tiny_llama(num_hidden_layers=2) if kind == "llama" else tiny_bert()).save_pretrained(tmp_path)
    model, factory = source_model(open_source(tmp_path))
    data = batches(model, TEXT, max_tokens=128, window=32, batch=2)
    grams = []

    def encode(codec, w, gram, name):
        grams.append((name, gram))
        return encode_calibrated(codec, w, gram, name)

    codec = get_codec({"id": "hadamard", "bits": 3})
    sequential_encode(model, factory, data, {n: codec for n in _linears(factory)}, encode=encode, asymmetric=True)
    block_grams = [g for _n, g in grams if g is not None and g.cross is not None]
    assert len(block_grams) >= 4
    first = block_grams[0]
    assert np.allclose(first.cross, first.xtx, rtol=1e-6, atol=1e-6)
    assert any(not np.allclose(g.cross, g.xtx, rtol=1e-3, atol=1e-3) for g in block_grams[1:])


def _inputs_by_linear(model, modules: dict, data) -> dict[str, torch.Tensor]:
    """name -> the rows (real tokens) every module of ``modules`` (name -> module of ``model``) reads on ``data``."""
    rows: dict[str, list] = {n: [] for n in modules}
    state = {"mask": None}

    def hook(name):
        def grab(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            rows[name].append(x if state["mask"] is None or x.shape[0] != state["mask"].numel() else x[state["mask"]])
        return grab

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for args, mask in data:
                state["mask"] = mask
                model(*args)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(r).double() for n, r in rows.items()}


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_sequential_grams_are_what_each_linear_reads_in_the_finished_model(kind, tmp_path):
    """Every Linear is calibrated after everything upstream of it was compressed, so its Gram is
    Σ x̃ᵀx̃ of what it reads in the finished model (the LM head's too, which runs from the last
    block's cached input), and a block Linear's cross term is Σ x̃ᵀx against the float model's x."""
    (tiny_llama(num_hidden_layers=3) if kind == "llama" else tiny_bert()).save_pretrained(tmp_path)
    model, factory = source_model(open_source(tmp_path))
    float_model = copy.deepcopy(model)
    data = batches(model, TEXT, max_tokens=128, window=32, batch=2)
    grams = {}

    def encode(codec, w, gram, name):
        grams[name] = gram
        return encode_calibrated(codec, w, gram, name)

    names = _linears(factory)
    codec = get_codec({"id": "hadamard", "bits": 3})
    sequential_encode(model, factory, data, {n: codec for n in names}, encode=encode, asymmetric=True)
    path = {id(m): p for p, m in model.named_modules()}
    float_modules = dict(float_model.named_modules())
    compressed = _inputs_by_linear(model, {n: factory.linears[n][0] for n in names}, data)
    floats = _inputs_by_linear(float_model, {n: float_modules[path[id(factory.linears[n][0])]] for n in names}, data)
    assert set(grams) == set(names) and sum(g.cross is not None for g in grams.values()) >= 4
    for n in names:
        x, xf = compressed[n], floats[n]
        assert grams[n].count == len(x)
        np.testing.assert_allclose(grams[n].xtx, (x.T @ x).numpy(), rtol=1e-4, atol=1e-4 * float(x.square().sum()) / len(x))
        if grams[n].cross is not None:
            np.testing.assert_allclose(grams[n].cross, (x.T @ xf).numpy(), rtol=1e-4,
                                       atol=1e-4 * float(x.square().sum()) / len(x))


class _MemoryReused(torch.nn.Module):
    """``b`` reads other values in the very memory ``a`` read (as when the allocator hands a freed
    input's memory to the next Linear's input)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False)

    def forward(self, x):
        t = x * 2.0
        h = self.a(t)
        return self.b(t.copy_(torch.tanh(h)))


def test_linears_whose_inputs_share_an_address_in_turn_are_separate_stages():
    """A stage is the Linears reading one input; an input's memory holding the next Linear's input
    (same shape, other values) once grouped both, so ``b`` was encoded with ``a``'s Gram (seen as
    conversions that differed from run to run, 1 in 5 with 2 jobs on MiniLM)."""
    torch.manual_seed(0)
    model = _MemoryReused()
    factory = SimpleNamespace(linears={"a": (model.a, False), "b": (model.b, False)})
    data = [((torch.randn(1, 32, 64),), None) for _ in range(2)]
    grams = {}

    def encode(codec, w, gram, name):
        grams[name] = gram
        return encode_calibrated(codec, w, gram, name)

    codec = get_codec({"id": "hadamard", "bits": 4})
    with torch.no_grad():
        sequential_encode(model, factory, data, {"a": codec, "b": codec}, encode=encode, asymmetric=False)
        x = torch.cat([args[0].reshape(-1, 64) for args, _m in data]).double()
        hb = torch.tanh(model.a(torch.cat([args[0] for args, _m in data]) * 2.0)).reshape(-1, 64).double()
    assert grams["a"] is not grams["b"]
    assert np.allclose(grams["a"].xtx, (4.0 * x.T @ x).numpy(), rtol=1e-4, atol=1e-3)
    assert np.allclose(grams["b"].xtx, (hb.T @ hb).numpy(), rtol=1e-3, atol=1e-2)


class _SharedInput(torch.nn.Module):
    """``a`` and ``b`` read one tensor in turn (as q/k/v do); ``c`` reads another."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(64, 64, bias=False) for _ in range(3))

    def forward(self, x):
        t = x * 2.0
        return self.c(torch.tanh(self.a(t) + self.b(t)))


@pytest.mark.parametrize("kind", [_SharedInput, _MemoryReused])
def test_float_grams_are_each_linears_input_products_shared_by_readers_of_one_input(kind):
    torch.manual_seed(0)
    model = kind()
    factory = SimpleNamespace(linears={n: (getattr(model, n), False) for n in ("a", "b", "c") if hasattr(model, n)})
    data = [((torch.randn(1, 32, 64),), None) for _ in range(2)]
    inputs: dict[str, list] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, 64).double()))
             for n, (m, _t) in factory.linears.items()]
    with torch.no_grad():
        for args, _m in data:
            model(*[a.clone() for a in args])
    for h in hooks:
        h.remove()
    grams = float_grams(model, factory, data, list(factory.linears))
    for n, rows in inputs.items():
        x = torch.cat(rows)
        assert grams[n].count == x.shape[0] == 64
        assert np.allclose(grams[n].xtx, (x.T @ x).numpy(), rtol=1e-4, atol=1e-3), n
    assert (grams["a"] is grams["b"]) == (kind is _SharedInput)
    assert grams["a"] is not grams.get("c")


def test_the_allocation_probes_the_calibrated_encoding_where_a_gram_is_given(dense, monkeypatch):
    """With a weight's Gram the damage is measured on its GPTQ encoding at the probe setting, without
    one on round-to-nearest's."""
    from rbe_core.compression import calibration

    model, factory, data = dense
    names = _linears(factory)[:2]
    seen = {}
    measure = calibration.output_damage

    def spy(model, factory, data, names, replace, **kw):
        return measure(model, factory, data, names, lambda n: seen.setdefault(n, replace(n)), **kw)

    monkeypatch.setattr(calibration, "output_damage", spy)
    settings = [get_codec({"id": "hadamard", "bits": b}) for b in (8, 4, 3, 2)]
    grams = float_grams(model, factory, data, names)
    allocate_settings(model, factory, data, names, settings, 5.0, grams={names[0]: grams[names[0]]})
    w = {n: factory.linears[n][0].weight.detach().numpy() for n in names}
    rounded = {n: settings[2].encode(w[n]).decode().reshape(w[n].shape) for n in names}
    calibrated = encode_calibrated(settings[2], w[names[0]], grams[names[0]], names[0]).decode().reshape(w[names[0]].shape)
    assert np.array_equal(seen[names[0]], calibrated) and not np.array_equal(calibrated, rounded[names[0]])
    assert np.array_equal(seen[names[1]], rounded[names[1]])


@pytest.mark.parametrize("budget", [None, 0])
def test_conversions_probe_calibrated_encodings_while_the_grams_fit(budget, tmp_path, monkeypatch):
    from rbe_core.compression import calibration

    tiny_llama(num_hidden_layers=2).save_pretrained(tmp_path / "hf")
    if budget is not None:
        monkeypatch.setattr(calibration, "PROBE_GRAM_BYTES", budget)
    probed = []
    make = calibration.float_grams
    monkeypatch.setattr(calibration, "float_grams", lambda *a: probed.append(a[3]) or make(*a))
    rbe_core.compress_model(tmp_path / "hf", tmp_path / "m.rbe", target_bpw=4.5, progress=False, calibration_tokens=256)
    assert len(probed) == (1 if budget is None else 0)
    assert not probed or len(probed[0]) == 15  # every budgeted Linear: the two blocks' and the untied head


def test_the_probe_reads_its_kinds_tokens_within_the_calibrations(tmp_path, monkeypatch):
    from rbe_core.compression import calibration

    tiny_llama(num_hidden_layers=1).save_pretrained(tmp_path / "hf")
    monkeypatch.setattr(calibration, "PROBE_TOKENS", {"causal": 128, "encoder": 64})
    asked = []
    make = calibration._probe_grams
    monkeypatch.setattr(calibration, "_probe_grams", lambda *a: asked.append(a[3]) or make(*a))
    for tokens in (256, 96):
        rbe_core.compress_model(tmp_path / "hf", tmp_path / "m.rbe", target_bpw=4.5, progress=False,
                                calibration_tokens=tokens)
    assert asked == [128, 96]
