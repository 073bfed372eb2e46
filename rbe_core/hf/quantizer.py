"""transformers integration: ``RbeConfig`` and ``RbeHfQuantizer`` under ``quant_method: "rbe"``.

``register()`` adds both to transformers' registries, once; ``import rbe_core`` runs it when (and
only when) transformers' quantizer registry is imported (``rbe_core.hf.autoregister``).
Then ``from_pretrained(path, quantization_config=RbeConfig(codec=...))`` compresses while loading
(after the dense weights are in: the peak is the dense model), ``save_pretrained`` writes the codes
into the safetensors (``QuantizedLinear`` buffers; every layer's codec, shape, payload fields and
checksum in ``config.json`` under ``quantization_config.modules``), and ``from_pretrained`` of such
a folder builds empty ``QuantizedLinear`` shells that the normal state-dict load fills, checked
against the recorded checksums. Written against transformers 5.23 (the project's pin).
"""

from __future__ import annotations

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer

from ..version import __version__
from .config import QUANT_METHOD, RbeConfig

__all__ = ["QUANT_METHOD", "RbeConfig", "RbeHfQuantizer", "register"]


class RbeHfQuantizer(HfQuantizer):
    """The ``HfQuantizer`` for rbe: quantize-on-load, load of saved codes, save, dequantize; trainable (LoRA)."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            return model
        from ..layers import set_module
        from ..registry import get_backend
        from .layers import QuantizedLinear

        modules = self.quantization_config.modules
        if not modules:
            raise ValueError("this checkpoint's rbe quantization_config lists no quantized modules")
        backend = get_backend(self.quantization_config.backend)
        for name, entry in modules.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"the rbe checkpoint quantizes {name!r}, which this model does not have") from None
            set_module(model, name, QuantizedLinear.shell(entry, getattr(old, "bias", None) is not None, backend))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .quantize import quantize, quantized_modules, record

        if self.pre_quantized:
            for layer in quantized_modules(model).values():
                layer.refresh()
            model.hf_quantizer = self
            record(model, None, None, None, None, None)
            return model
        c = self.quantization_config
        calibration = tokenizer = None
        if c.calibration:
            from pathlib import Path

            from transformers import AutoTokenizer

            calibration = Path(c.calibration).read_text(encoding="utf-8", errors="replace")
            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        model.hf_quantizer = self
        return quantize(model, c.codec, target_bpw=c.target_bpw, calibration=calibration, tokenizer=tokenizer,
                        include=c.include, exclude=c.exclude, backend=c.backend)

    def get_state_dict_and_metadata(self, model):
        """The state dict as is (the codes are buffers); the metadata names rbe and every layer's entry."""
        import json

        return None, {"rbe": __version__, "rbe.modules": json.dumps(self.quantization_config.modules, sort_keys=True)}

    def _dequantize(self, model, dtype=None):
        from .quantize import dequantize

        model = dequantize(model)
        return model if dtype is None else model.to(dtype)

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register ``RbeConfig`` and ``RbeHfQuantizer`` with transformers (no-op when already there)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(RbeConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(RbeHfQuantizer)
