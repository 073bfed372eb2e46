"""transformers and PEFT integration: in-place ``quantize``, ``RbeConfig``/``RbeHfQuantizer``, LoRA on rbe layers.

Importing this package is light (no torch, transformers or PEFT): the public names below are
imported from their modules on first use. ``import rbe_core`` registers ``quant_method: "rbe"``
with transformers and rbe's LoRA layer with PEFT's dispatch as soon as those are imported
(``autoregister``); ``register()`` does the former by hand.
"""

import importlib
import sys
import types

#: Public name -> the submodule defining it (they need torch, and transformers for the last three).
_LAZY = {"QuantizedLinear": "layers", "dequantize": "quantize", "footprint": "quantize", "quantize": "quantize",
         "quantized_modules": "quantize", "select_modules": "quantize", "RbeConfig": "config",
         "RbeHfQuantizer": "quantizer", "register": "quantizer"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps ``rbe_core.hf.quantize`` the function: importing the submodule of that name would
    otherwise bind the module over it (the import system sets a package's attribute per submodule)."""

    def __setattr__(self, name: str, value) -> None:
        if name == "quantize" and isinstance(value, types.ModuleType):
            value = value.quantize
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["QuantizedLinear", "RbeConfig", "RbeHfQuantizer", "dequantize", "footprint", "quantize",
           "quantized_modules", "register", "select_modules"]
