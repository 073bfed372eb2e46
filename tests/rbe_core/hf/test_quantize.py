"""``rbe_core.hf.quantize`` on every architecture family transformers builds: layers, head, memory, outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import rbe_core
from rbe_core.hf import QuantizedLinear, dequantize, footprint, quantize, quantized_modules

from .conftest import ARCHS, build, inputs, output


def _dense_linears(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_int8_replaces_every_linear_but_the_head_and_stays_close(arch, backend):
    model = build(arch)
    batch = inputs(arch)
    ref = output(model, batch)
    linears = _dense_linears(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in linears.items() if m is head), None)
    dense_bytes = model.get_memory_footprint()
    linear_bytes = sum(m.weight.numel() * 4 for n, m in linears.items() if n != head_name)

    quantize(model, "int8")

    layers = quantized_modules(model)
    assert set(layers) == {n for n in linears if n != head_name}
    assert all(m.backend is backend for m in layers.values())
    if head_name is not None:
        assert type(model.get_submodule(head_name)) is type(linears[head_name])  # untouched
    # memory: the dense weights are gone, the codes (and nothing else) took their place
    stored = footprint(model)["bytes"]
    expected = dense_bytes - linear_bytes + stored
    assert abs(model.get_memory_footprint() - expected) <= 0.02 * expected
    assert footprint(model)["bits_per_weight"] < 8.6
    out = output(model, batch)
    assert torch.allclose(out, ref, atol=0.05 * float(ref.abs().max()))
    assert float((out - ref).abs().max()) > 0  # it really runs from the codes


def test_layers_keep_the_linear_contract():
    model = build("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    w = conv.weight.detach().clone()
    quantize(model, "int8")
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, QuantizedLinear) and layer.conv1d
    assert (layer.in_features, layer.out_features) == (64, 192)
    assert layer.weight.shape == w.shape  # Conv1D layout (in, out), decoded
    assert float((layer.weight - w).abs().max()) < 0.02 * float(w.abs().max())
    assert set(layer.state_dict()) == {"weight", "bias"} | {f"rbe_{f}" for f in layer.encoded.payload}
    assert layer.state_dict()["weight"].numel() == 0  # the marker


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_dequantize_is_the_codes_decoded_bit_for_bit(arch):
    model = quantize(build(arch), {"id": "hadamard", "bits": 4})
    decoded = {n: m.encoded.decode() for n, m in quantized_modules(model).items()}
    conv = {n for n, m in quantized_modules(model).items() if m.conv1d}
    batch = inputs(arch)
    before = output(model, batch)
    dequantize(model)
    assert not quantized_modules(model)
    for n, d in decoded.items():
        w = model.get_submodule(n).weight.detach().numpy()
        np.testing.assert_array_equal(w.T if n in conv else w, d)
        assert type(model.get_submodule(n)).__name__ == ("Conv1D" if n in conv else "Linear")
    assert torch.allclose(output(model, batch), before, atol=1e-4, rtol=1e-4)


def test_the_top_level_name_is_the_same_function():
    assert rbe_core.quantize is quantize


def test_include_exclude_and_the_tied_head():
    model = build("llama")
    quantize(model, "int8", include=["*.mlp.*"], exclude=["down_proj"])
    assert sorted(quantized_modules(model)) == [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj")]
    model = build("llama")
    quantize(model, "int8", include=["lm_head"])
    assert list(quantized_modules(model)) == ["lm_head"]
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, tie_word_embeddings=True)
    tied_model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="tied"):
        quantize(tied_model, "int8", include=["lm_head"])
    quantize(tied_model, "int8")
    assert "lm_head" not in quantized_modules(tied_model)


def test_bad_input_is_a_clear_error():
    with pytest.raises(rbe_core.UnknownCodecError):
        quantize(build("llama"), "no-such-codec")
    model = build("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="up_proj.*NaN"):
        quantize(model, "int8")
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize(build("llama"), "int8", include=["no_such_module"])
    with pytest.raises(ValueError, match="positive"):
        quantize(build("llama"), target_bpw=-1)


def test_target_bpw_without_calibration_stays_within_budget():
    model = quantize(build("llama"), {"id": "hadamard"}, target_bpw=4.5)
    bits = {m.encoded.codec.get_config().get("bits") for m in quantized_modules(model).values()}
    stored = sum(m.encoded.nbytes for m in quantized_modules(model).values())
    weights = sum(m.encoded.numel for m in quantized_modules(model).values())
    assert 8.0 * stored / weights <= 4.5 + 1e-9
    assert len(bits) >= 1


def test_target_bpw_without_a_codec_picks_what_rbe_convert_picks():
    """Causal LMs budget the flagship's settings, encoders trellis codes' (``budget_candidates``)."""
    for arch, codec_id in (("llama", "hadamard"), ("bert", "trellis")):
        model = quantize(build(arch), target_bpw=4.5)
        assert {m.encoded.codec.codec_id for m in quantized_modules(model).values()} == {codec_id}


def _output_error(model, ref_model, batches) -> float:
    return sum(float((output(model, b) - output(ref_model, b)).square().mean()) for b in batches)


def test_calibration_runs_layer_sequential_gptq_on_the_module_tree():
    """Hooks on the HF module tree (no architecture code): GPTQ on the inputs each layer sees beats
    round-to-nearest on held-out inputs, and a budget allocates bits by measured damage."""
    ref = build("llama")
    calib = [torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    held_out = [{"input_ids": torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(100 + s))}
                for s in range(2)]
    codec = {"id": "hadamard", "bits": 3}
    rtn = quantize(build("llama"), codec)
    gptq = quantize(build("llama"), codec, calibration=calib)
    assert _output_error(gptq, ref, held_out) < _output_error(rtn, ref, held_out)
    symmetric = quantize(build("llama"), codec, calibration=calib, asymmetric=False)
    assert _output_error(symmetric, ref, held_out) < _output_error(rtn, ref, held_out)
    codes = lambda m: [x.encoded.checksum for x in quantized_modules(m).values()]  # noqa: E731
    assert codes(symmetric)[0] == codes(gptq)[0]  # the first layer sees the float inputs either way
    assert codes(symmetric) != codes(gptq)
    budgeted = quantize(build("llama"), {"id": "hadamard"}, target_bpw=3.5, calibration=calib)
    layers = quantized_modules(budgeted).values()
    assert 8.0 * sum(m.encoded.nbytes for m in layers) / sum(m.encoded.numel for m in layers) <= 3.5 + 1e-9
    assert len({m.encoded.codec.get_config()["bits"] for m in layers}) > 1  # damage-driven, not uniform


def test_calibration_on_an_encoder_with_padding():
    ref = build("bert")
    batch = {"input_ids": torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3)),
             "attention_mask": torch.ones(4, 16, dtype=torch.long)}
    batch["attention_mask"][0, 10:] = 0
    model = quantize(build("bert"), {"id": "hadamard", "bits": 4}, calibration=[batch])
    out, want = output(model, batch), output(ref, batch)
    assert torch.nn.functional.cosine_similarity(out.flatten(), want.flatten(), dim=0) > 0.98


def test_calibration_smooths_the_norms_into_the_layers_that_read_them():
    """As ``rbe convert``: each decoder layer's norms give per-channel scales to q/k/v and gate/up
    (``compression.smoothing``); ``smoothing=False`` leaves them."""
    calib = [torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    ref = build("llama")
    norms = lambda m: {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith("layernorm.weight")}  # noqa: E731
    smoothed = norms(quantize(build("llama"), {"id": "hadamard", "bits": 4}, calibration=calib))
    kept = norms(quantize(build("llama"), {"id": "hadamard", "bits": 4}, calibration=calib, smoothing=False))
    assert smoothed and all(torch.equal(kept[n], p) for n, p in norms(ref).items())
    assert not any(torch.equal(smoothed[n], p) for n, p in norms(ref).items())
