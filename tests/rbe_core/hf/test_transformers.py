"""``quant_method: "rbe"`` in transformers: quantize on load, save_pretrained, from_pretrained in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rbe_core.hf import RbeConfig, quantize, quantized_modules, register
from rbe_core.hf.quantizer import RbeHfQuantizer

from .conftest import CAUSAL, build, inputs, output

CODEC = {"id": "hadamard", "bits": 4}


def _fresh_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)


def _generate(model, ids: torch.Tensor) -> list[int]:
    return model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)[0].tolist()


def test_register_is_idempotent_and_guarded():
    register()
    register()
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["rbe"] is RbeConfig
    assert AUTO_QUANTIZER_MAPPING["rbe"] is RbeHfQuantizer
    with pytest.raises(ValueError, match="unknown option"):
        RbeConfig(codec="int8", bits=4)


def test_save_reload_in_a_fresh_process_generates_the_same(tmp_path):
    """Every causal family: greedy generate identical after save_pretrained -> from_pretrained in a
    new interpreter; the safetensors hold the codes, config.json the codec map, no pickle."""
    ids = inputs("llama")["input_ids"][:1]
    expected = {}
    for arch in CAUSAL:
        model = quantize(build(arch), CODEC)
        expected[arch] = _generate(model, ids)
        model.save_pretrained(tmp_path / arch)
        cfg = json.loads((tmp_path / arch / "config.json").read_text())["quantization_config"]
        assert cfg["quant_method"] == "rbe"
        assert set(cfg["modules"]) == set(quantized_modules(model))
        assert not list((tmp_path / arch).glob("*.bin"))
        with safe_open(str(tmp_path / arch / "model.safetensors"), "pt") as f:
            assert f.metadata()["rbe"] and json.loads(f.metadata()["rbe.modules"]) == cfg["modules"]
            name = next(iter(cfg["modules"]))
            assert f.get_tensor(f"{name}.weight").numel() == 0
            assert f.get_tensor(f"{name}.rbe_nibbles").dtype == torch.uint8  # 4-bit hadamard codes
    code = """
import json, sys, torch, rbe_core.hf, transformers
ids = torch.tensor(json.loads(sys.argv[2]))
out = {}
for arch in json.loads(sys.argv[3]):
    m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1] + "/" + arch)
    assert all(type(l).__name__ == "QuantizedLinear" for n, l in m.named_modules() if n in m.config.quantization_config.modules)
    out[arch] = m.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)[0].tolist()
print(json.dumps(out))
"""
    res = _fresh_python(code, str(tmp_path), json.dumps(ids.tolist()), json.dumps(CAUSAL))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected


def test_reload_is_bit_identical_and_dequantizes(tmp_path):
    model = quantize(build("llama"), CODEC)
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, layer in quantized_modules(model).items():
        other = again.get_submodule(name)
        assert other.encoded.checksum == layer.encoded.checksum
    decoded = {n: m.encoded.decode() for n, m in quantized_modules(again).items()}
    plain = again.dequantize()
    assert not quantized_modules(plain) and getattr(plain.config, "quantization_config", None) is None
    for n, d in decoded.items():
        np.testing.assert_array_equal(plain.get_submodule(n).weight.detach().numpy(), d)


def test_quantize_equals_from_pretrained_with_a_config(tmp_path):
    dense = build("qwen2")
    dense.save_pretrained(tmp_path)
    direct = quantize(build("qwen2"), CODEC)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=RbeConfig(codec=CODEC))
    a, b = quantized_modules(direct), quantized_modules(loaded)
    assert set(a) == set(b) and a
    assert all(a[n].encoded.checksum == b[n].encoded.checksum for n in a)
    batch = inputs("qwen2")
    assert torch.equal(output(direct, batch), output(loaded, batch))


def test_without_rbe_the_load_fails_loudly(tmp_path):
    quantize(build("llama"), CODEC).save_pretrained(tmp_path)
    code = "import sys, transformers; transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); print('LOADED')"
    res = _fresh_python(code, str(tmp_path))
    assert res.returncode != 0 and "LOADED" not in res.stdout
    assert "size mismatch" in res.stderr or "mismatched" in res.stderr or "ignore_mismatched_sizes" in res.stderr


def test_a_corrupted_checkpoint_is_refused(tmp_path):
    model = quantize(build("llama"), CODEC)
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    name = next(iter(quantized_modules(model)))
    tensors[f"{name}.rbe_nibbles"] = tensors[f"{name}.rbe_nibbles"] ^ 1
    save_file(tensors, str(path), metadata={"format": "pt", "rbe": "test"})
    with pytest.raises(Exception, match="checksum"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_the_quickstart_example_runs():
    """examples/hf_quickstart.py: an architecture rbe has no code for, end to end (the issue's acceptance)."""
    from pathlib import Path

    script = Path(__file__).parents[3] / "examples" / "hf_quickstart.py"
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "generate identical = True" in res.stdout and "still rbe layers: 28" in res.stdout
