"""PEFT LoRA on ``QuantizedLinear``: adapters train with the codes frozen; merging re-encodes.

``enable()`` (run by ``import rbe_core`` once PEFT's LoRA model module is imported:
``rbe_core.hf.autoregister``) puts ``dispatch_rbe`` in front of PEFT's LoRA dispatchers (once), so
``peft.get_peft_model`` and ``PeftModel.from_pretrained`` wrap rbe layers like any Linear. The
frozen base runs through the backend's fused kernels in both passes (``linear`` forward,
``linear_grad_input`` backward); gradients reach only the adapters. ``merge`` decodes the weight,
adds ``B @ A · scaling`` and re-encodes it with the layer's own codec; the re-encoding error
(relative Frobenius norm against the exact merged weight) is kept in ``merge_errors`` and logged.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from peft.tuners.lora import model as lora_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .layers import QuantizedLinear

log = logging.getLogger("rbe.hf")


class RbeLoraLinear(nn.Module, LoraLayer):
    """LoRA adapters around a frozen ``QuantizedLinear`` (plain LoRA: no DoRA or other variants)."""

    def __init__(self, base_layer: QuantizedLinear, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs) -> None:
        if getattr(config, "lora_bias", False):
            raise ValueError("rbe's LoRA layer does not support lora_bias")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self.merge_errors: dict[str, float] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module):
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config, **kwargs):
        if getattr(config, "use_dora", False):
            raise ValueError("rbe's LoRA layer supports plain LoRA only (use_dora=False)")
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight).float() * self.scaling[adapter]

    def _reencode(self, weight: torch.Tensor, adapter: str) -> None:
        base = self.get_base_layer()
        w = np.ascontiguousarray(weight.detach().float().cpu().numpy())
        enc = base.encoded.codec.encode(w, source=base.encoded.source)
        err = float(np.linalg.norm(enc.decode() - w) / max(np.linalg.norm(w), 1e-30))
        self.merge_errors[adapter] = err
        log.info("rbe: merged adapter %r into %s, re-encoding error %.4g (relative Frobenius)",
                 adapter, base.encoded.source or "a layer", err)
        base.set_encoded(enc)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Decode, add the adapters' ``B @ A · scaling``, re-encode with the layer's codec (lossy:
        the error is in ``merge_errors``)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            merged = self.get_base_layer().dense_weight() + self.get_delta_weight(adapter).cpu()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {adapter!r} seems broken")
            self._reencode(merged, adapter)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged adapters and re-encode again (a second rounding: not the original codes)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                self._reencode(self.get_base_layer().dense_weight() - self.get_delta_weight(adapter).cpu(), adapter)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            a, b = self.lora_A[adapter], self.lora_B[adapter]
            h = self.lora_dropout[adapter](x.to(a.weight.dtype))
            result = result + (b(a(h)) * self.scaling[adapter]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch_rbe(target: nn.Module, adapter_name: str, config=None, **kwargs):
    """PEFT dispatcher: an ``RbeLoraLinear`` for a ``QuantizedLinear`` target, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, QuantizedLinear):
        return RbeLoraLinear(target, adapter_name, config=config, **kwargs)
    return None


def enable() -> None:
    """Make PEFT's LoRA dispatch try ``dispatch_rbe`` first (idempotent)."""
    original = lora_model.LoraModel._create_new_module
    if getattr(original, "_rbe", False):
        return

    def create_new_module(lora_config, adapter_name, target, **kwargs):
        module = dispatch_rbe(target, adapter_name, config=lora_config, **kwargs)
        return module if module is not None else original(lora_config, adapter_name, target, **kwargs)

    create_new_module._rbe = True
    lora_model.LoraModel._create_new_module = staticmethod(create_new_module)
