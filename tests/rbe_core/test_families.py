"""Every decoder family of the declarative description against transformers built from the same
random config (raw codec: exact weights): logits at every position, KV-cached decoding past the
sliding windows, greedy generation; the same weights as a llama.cpp GGUF; HF export of the GGUF;
the native engine where it runs the description."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helpers importable
from _model_helpers import FAMILY_MODELS, tiny_family, torch, transformers, write_gguf  # noqa: E402

import rbe_core  # noqa: E402
from rbe_core.models import ModelError  # noqa: E402
from rbe_core.models.decoder import MoE  # noqa: E402
from rbe_core.models.families.decoder import DECODER_SPECS, FAMILIES, GGUF_ARCHS, described  # noqa: E402

#: max |rbe - transformers| relative to max |transformers| over the compared logits
TOL = 1e-4
VARIANTS = list(FAMILY_MODELS)
#: variants whose features llama.cpp's GGUF carries (Mistral: no arch of its own; a query scale
#: other than 1/sqrt(head_dim) and dense layers between MoE layers: no GGUF key)
GGUF_VARIANTS = [v for v in VARIANTS if v not in ("mistral", "gemma2-scalar", "qwen3_moe-mixed")]
EXPORT_VARIANTS = ["llama-tied", "qwen2-yarn", "qwen3", "qwen3_moe", "gemma2", "gemma3", "phi3", "phi3-partial",
                   "smollm3", "olmo2"]
PROMPT, NEW = 5, 8  # generation runs past every window (4 or 5 positions)


def _family(variant: str) -> str:
    return {"qwen2-yarn": "qwen2", "llama3": "llama", "llama-tied": "llama", "qwen3_moe-mixed": "qwen3_moe",
            "gemma2-scalar": "gemma2", "phi3-partial": "phi3"}.get(variant, variant)


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _ids(seed: int, batch: int = 2, length: int = 12):
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second intra-op thread; on a busy machine it only spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """variant -> (transformers reference, .rbe of its HF checkpoint, their folder), built once."""
    cache: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in cache:
            ref = tiny_family(variant)
            d = tmp_path_factory.mktemp(variant)
            ref.save_pretrained(d / "hf")
            path = rbe_core.compress_model(d / "hf", d / "m.rbe", codec="raw", progress=False)
            cache[variant] = ref, path, d
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def made_gguf(made):
    """variant -> (.rbe of the variant's weights written as a GGUF, names of the GGUF's tensors)."""
    cache: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in cache:
            ref, _, d = made(variant)
            write_gguf(ref, d / "m.gguf", quantize_embedding=False)
            names = [t.name for t in gguf.GGUFReader(str(d / "m.gguf")).tensors]
            path = rbe_core.compress_model(d / "m.gguf", d / "g.rbe", codec="raw", progress=False)
            cache[variant] = path, names
        return cache[variant]

    return get


def _check_logits(model, ref, ids):
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)[0]
    assert got.shape == want.shape
    assert _rel(got[:, -1], want[:, -1]) <= TOL  # the last position (what generation samples from)
    assert _rel(got, want) <= TOL  # and every position
    return want


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_family_matches_transformers(variant, backend, made):
    ref, path, _ = made(variant)
    model = rbe_core.load_model(path, backend=backend, engine="torch")
    assert model.spec.name == _family(variant) and model.config["family"] == _family(variant)
    ids = _ids(2)
    want = _check_logits(model, ref, ids)
    # KV-cached decoding, one token at a time from well inside the window to past it
    with torch.no_grad():
        logits, past = model(ids[:, :2])
        for t in range(2, ids.shape[1]):
            step, past = model(ids[:, t:t + 1], past)
            logits = torch.cat([logits, step], 1)
    assert _rel(logits, want) <= TOL
    greedy = list(model.generate_ids(ids[0, :PROMPT].tolist(), NEW))
    with torch.no_grad():
        hf = ref.generate(ids[:1, :PROMPT], max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy == hf[0, PROMPT:PROMPT + len(greedy)].tolist()
    assert len(greedy) == NEW or greedy[-1] in model.eos_ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_rope_frequencies_are_transformers_bit_for_bit(variant, made):
    """The torch modules' inverse RoPE frequencies of the default kind equal transformers' exactly:
    a 1-ulp difference in a few of them changed a calibrated conversion's codes (SmolLM2 flagship
    perplexity 19.83 -> 20.39). Other kinds (YaRN, Llama 3, Gemma 3's sliding layers) are only
    compared through the logits."""
    ref, path, _ = made(variant)
    model = rbe_core.load_model(path, backend="torch", engine="torch")
    kinds = [r.get("type", "default") for r in model.config.get("ropes", [{}])]
    if "default" not in kinds:
        pytest.skip(f"{variant}: no default RoPE")
    theirs = [b for n, b in ref.model.rotary_emb.named_buffers() if n.endswith("inv_freq") and "original" not in n]
    for rope, kind in zip(model.ropes, kinds, strict=True):
        if kind == "default":  # Gemma 3: one table per layer type, ours the sliding layers'
            assert any(torch.equal(rope.inv_freq, t.to(rope.inv_freq.dtype)) for t in theirs), variant


@pytest.mark.parametrize("theta, head_dim", [(1e6, 128), (1e4, 256), (1.5e5, 64)])  # Qwen2.5, Gemma 2, a case
def test_default_rope_of_real_shapes_is_transformers_bit_for_bit(theta, head_dim):
    """Head dims and thetas of real models, where a float32 table from numpy differs from
    transformers' in a frequency or two: the torch modules still equal transformers exactly."""
    from rbe_core.models.decoder import _rope
    from rbe_core.models.families.decoder import _rope_table

    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=head_dim, rope_theta=theta)
    want = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg).inv_freq
    d = {"head_dim": head_dim, "rope_style": "half", "rotary_dim": head_dim, "rope_freqs": None}
    rope = {"type": "default", "theta": theta}
    table, factor = _rope_table(rope, head_dim, 4096, None)
    assert torch.equal(_rope(d, rope, table, factor).inv_freq, want)
    assert np.abs(table - want.numpy()).max() <= 2e-7 * want.abs().max().item()  # the engine's table: within an ulp


def test_description_features_are_used(made):
    """The tiny configs exercise what they are meant to (a test of the tests)."""
    cfg = {v: rbe_core.load_model(made(v)[1], backend="numpy", engine="torch").config
           for v in ("mistral", "gemma2", "gemma3", "phi3-partial", "smollm3", "qwen2-yarn", "llama3", "olmo2")}
    assert cfg["mistral"]["layer_window"] == [5, 5, 5]
    assert cfg["gemma2"]["layer_window"] == [4, 0, 4, 0] and cfg["gemma2"]["attn_softcap"] == 2.0
    assert cfg["gemma3"]["layer_window"] == [4] * 5 + [0] and cfg["gemma3"]["layer_rope"] == [1] * 5 + [0]
    assert cfg["gemma3"]["ropes"][0]["type"] == "linear" and cfg["gemma3"]["qk_norm"] == "head"
    assert cfg["phi3-partial"]["rotary_dim"] == 8 and cfg["phi3-partial"]["fused"]
    assert cfg["smollm3"]["layer_rope"] == [0, 0, 0, -1]
    assert cfg["qwen2-yarn"]["ropes"][0]["type"] == "yarn" and cfg["qwen2-yarn"]["biases"] == ["q", "k", "v"]
    assert cfg["llama3"]["ropes"][0]["type"] == "llama3"
    assert cfg["olmo2"]["qk_norm"] == "full" and cfg["olmo2"]["norms"] == ["attn_post_norm", "ffn_post_norm"]


@pytest.mark.parametrize("variant", ["qwen3_moe", "qwen3_moe-mixed"])
def test_moe_routes_every_expert(variant, made):
    """The compared tokens reach every expert of every MoE layer (each expert's weights are checked)."""
    ref, path, _ = made(variant)
    model = rbe_core.load_model(path, backend="numpy", engine="torch")
    moe = {i: b.ffn for i, b in enumerate(model.layers) if isinstance(b.ffn, MoE)}
    assert sorted(moe) == ([0, 2] if variant.endswith("mixed") else [0, 1])
    used: dict[int, set] = {i: set() for i in moe}
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: used[i].update(
        mod.route(args[0].reshape(-1, args[0].shape[-1]))[1].flatten().tolist())) for i, m in moe.items()]
    with torch.no_grad():
        model(_ids(2))  # test_family_matches_transformers' tokens
    for h in hooks:
        h.remove()
    assert all(u == {0, 1, 2, 3} for u in used.values()), used


def _check_gguf_names(variant: str, names: list[str]) -> None:
    """Every tensor written is one llama.cpp knows for the arch (``gguf``'s own tables)."""
    arch = FAMILIES[_family(variant)].gguf_arch
    kind = next(k for k, v in gguf.constants.MODEL_ARCH_NAMES.items() if v == arch)
    n = max(int(m.group(1)) for m in (re.match(r"blk\.(\d+)\.", x) for x in names) if m) + 1
    known = {gguf.constants.TENSOR_NAMES[t].format(bid=i) for t in gguf.constants.MODEL_TENSORS[kind] for i in range(n)}
    unknown = [x for x in names if x.rsplit(".", 1)[0] not in known]
    assert not unknown, unknown


@pytest.mark.parametrize("variant", GGUF_VARIANTS)
def test_gguf_matches_transformers(variant, made, made_gguf):
    ref, _, _ = made(variant)
    path, names = made_gguf(variant)
    _check_gguf_names(variant, names)
    model = rbe_core.load_model(path, backend="torch", engine="torch")
    assert model.spec.name == _family(variant) and model.config["naming"] == "gguf"
    assert model.config["rope_style"] == ("interleaved" if FAMILIES[_family(variant)].permuted_gguf else "half")
    # the GGUF's key/values describe what the HF config does (llama.cpp's own layer patterns)
    gg, hf = described(model.config), described(rbe_core.open(made(variant)[1]).metadata["rbe.model"]["config"])
    for key in ("layer_window", "layer_rope", "rotary_dim", "norms", "qk_norm", "fused", "biases", "moe",
                "embed_scale", "attn_softcap", "final_softcap", "tie_embeddings"):
        assert gg[key] == hf[key], key
    kinds = [r["type"] for r in hf["ropes"]]
    assert [r["type"] for r in gg["ropes"]] == (["default"] if kinds == ["llama3"] else kinds)
    assert (gg["rope_freqs"] is not None) == (kinds == ["llama3"])
    want = _check_logits(model, ref, _ids(2))
    with torch.no_grad():
        logits, past = model(_ids(2)[:, :3])
        for t in range(3, 12):
            step, past = model(_ids(2)[:, t:t + 1], past)
            logits = torch.cat([logits, step], 1)
    assert _rel(logits, want) <= TOL


@pytest.mark.parametrize("variant", EXPORT_VARIANTS)
def test_gguf_export_reloads_in_transformers(variant, made, made_gguf, tmp_path):
    ref, _, _ = made(variant)
    out = rbe_core.export_hf(made_gguf(variant)[0], tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(ref)
    ids = _ids(3)
    with torch.no_grad():
        assert _rel(back(ids).logits, ref(ids).logits) <= TOL


def test_gguf_llama3_rope_freqs_do_not_export(made_gguf, tmp_path):
    """A GGUF's Llama 3 frequency divisors have no HF form: export says so, writes nothing."""
    with pytest.raises(ModelError, match="rope_freqs"):
        rbe_core.export_hf(made_gguf("llama3")[0], tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_unknown_architecture_is_one_line_naming_the_described(made, tmp_path):
    _, _, d = made("llama-tied")
    shutil.copytree(d / "hf", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon_mamba"}))
    with pytest.raises(ModelError) as err:
        rbe_core.compress_model(tmp_path / "hf", tmp_path / "bad.rbe", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "falcon_mamba" in msg
    assert all(t in msg for s in DECODER_SPECS.values() for t in s.hf_model_types)
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError) as err:
        rbe_core.compress_model(tmp_path / "x.gguf", tmp_path / "bad.rbe", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "falcon" in msg and all(a in msg for a in GGUF_ARCHS)
    assert not (tmp_path / "bad.rbe").exists()


def _native_cases():
    return [(v, "hf") for v in VARIANTS] + [(v, "gguf") for v in GGUF_VARIANTS]


@pytest.mark.parametrize(("variant", "source"), _native_cases())
def test_native_engine_runs_the_description(variant, source, made, made_gguf, monkeypatch):
    """The C engine: every position's logits through prefill and one-token steps past the
    windows, greedy tokens, from the HF checkpoint and from the GGUF (llama.cpp's names and
    layouts, experts as 3-D tensors, Llama 3 frequency divisors)."""
    monkeypatch.setenv("RBE_ENGINE_KV", "f32")  # the exact arithmetic (float16 cache, int8 prefill: close)
    monkeypatch.setenv("RBE_ENGINE_ACT", "f32")
    ref, path, _ = made(variant)
    if source == "gguf":
        path = made_gguf(variant)[0]
    model = rbe_core.load_model(path, backend="cffi", engine="native")
    assert model.engine_name == "native"
    ids = _ids(4, batch=1)
    with torch.no_grad():
        want = ref(ids).logits[0]
    logits, state = model.start(ids[0, :PROMPT].tolist())
    got = [logits]
    for t in range(PROMPT, ids.shape[1]):
        logits, state = model.step(int(ids[0, t]), state)
        got.append(logits)
    assert _rel(torch.stack(got), want[PROMPT - 1:]) <= TOL
    all_logits = model.native.forward(ids[0].numpy(), 0, all_logits=True)
    assert _rel(torch.from_numpy(all_logits), want) <= TOL
    greedy = list(model.generate_ids(ids[0, :PROMPT].tolist(), NEW))
    with torch.no_grad():
        hf = ref.generate(ids[:1, :PROMPT], max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy == hf[0, PROMPT:PROMPT + len(greedy)].tolist()


@pytest.mark.parametrize("variant", ["gemma3", "qwen3_moe", "phi3-partial"])
def test_native_engine_defaults_stay_close(variant, made, monkeypatch):
    """The engine's defaults (float16 KV cache, int8 prefill products) stay near the exact path."""
    monkeypatch.delenv("RBE_ENGINE_KV", raising=False)
    monkeypatch.delenv("RBE_ENGINE_ACT", raising=False)
    ref, path, _ = made(variant)
    model = rbe_core.load_model(path, backend="cffi", engine="native")
    ids = _ids(5, batch=1)
    with torch.no_grad():
        want = torch.log_softmax(ref(ids).logits[0], -1)
    got = torch.log_softmax(torch.from_numpy(model.native.forward(ids[0].numpy(), 0, all_logits=True)), -1)
    kl = float((want.exp() * (want - got)).sum(-1).mean())
    assert kl < 0.01, kl
