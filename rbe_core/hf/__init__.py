"""transformers and PEFT integration: in-place ``quantize``, ``RbeConfig``/``RbeHfQuantizer``, LoRA on rbe layers.

Importing this package registers ``quant_method: "rbe"`` with transformers and, when PEFT is
installed, rbe's LoRA layer with PEFT's dispatch.
"""

import importlib.util

from .layers import QuantizedLinear
from .quantize import dequantize, footprint, quantize, quantized_modules, select_modules

if importlib.util.find_spec("transformers") is not None:
    from .quantizer import RbeConfig, RbeHfQuantizer, register

    register()
if importlib.util.find_spec("peft") is not None:
    from . import lora

    lora.enable()

__all__ = ["QuantizedLinear", "RbeConfig", "RbeHfQuantizer", "dequantize", "footprint", "quantize",
           "quantized_modules", "register", "select_modules"]
