"""PEFT LoRA on rbe layers: codes frozen, gradients only on adapters, merge re-encodes with the error stated."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'rbe[hf]')")

from rbe_core.hf import quantize, quantized_modules  # noqa: E402
from rbe_core.hf.lora import RbeLoraLinear  # noqa: E402

from .conftest import build  # noqa: E402

CODEC = {"id": "hadamard", "bits": 4}


def _checksums(model) -> dict[str, str]:
    """Layer name (without PEFT's ``.base_layer``) -> checksum of its codes."""
    return {n.removesuffix(".base_layer"): m.encoded.checksum for n, m in quantized_modules(model).items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_trains_adapters_only_and_merges(arch, backend):
    model = quantize(build(arch), CODEC)
    checksums = _checksums(model)
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    wrapped = [m for m in pm.modules() if isinstance(m, RbeLoraLinear)]
    assert len(wrapped) == 2 * len(targets)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses, moved = [], set()
    for _ in range(6):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n for n in grads)
        moved |= {n.split(".")[-3] for n, g in grads.items() if float(g.abs().sum()) > 0}  # lora_A / lora_B
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert moved == {"lora_A", "lora_B"}  # B first (it starts at zero), then A: backward runs through the codes
    assert _checksums(model) == checksums  # codes frozen
    pm.eval()
    with torch.no_grad():
        adapted = pm(input_ids=ids).logits
    errors = {}
    for m in wrapped:
        m.merge()
        errors.update(m.merge_errors)
    assert errors and all(0 < e < 0.2 for e in errors.values())  # 4-bit re-encoding error, stated
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, RbeLoraLinear) for m in merged.modules())
    changed = [n for n, c in _checksums(merged).items() if c != checksums[n]]
    assert len(changed) == len(wrapped)
    with torch.no_grad():
        after = merged(input_ids=ids).logits
    base_gap = float((adapted - after).abs().mean())
    assert base_gap < 0.5 * float(adapted.abs().mean())


def test_lora_refuses_what_it_does_not_do():
    model = quantize(build("llama"), CODEC)
    with pytest.raises(ValueError, match="plain LoRA"):
        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
