"""rbe core: interfaces, plugin registry, the .rbe container and the public API.

    import rbe_core
    enc = rbe_core.get_codec("int8").encode(weight)
    rbe_core.save("model.rbe", {"w": enc})
    y = rbe_core.get_backend().linear(x, rbe_core.open("model.rbe")["w"])
"""

from .abc import Backend, Codec, DerivativeEngine, Encoded, Geometry, Quantizer
from .compression.quality import report
from .container import FORMAT_VERSION, RBEFile, save
from .errors import (
    BackendUnavailableError,
    ChecksumError,
    InvalidWeightError,
    RBEError,
    RBEFormatError,
    UnknownCodecError,
)
from .files import open
from .hf import autoregister as _autoregister
from .hookspecs import hookimpl
from .registry import get_backend, get_codec, list_backends, list_codecs, registry, reload_plugins
from .version import __version__  # noqa: F401 - re-exported: rbe_core.__version__

#: Model and layer API, imported on first use so ``import rbe_core`` (and every plugin) stays torch-free.
_LAZY = {"compress_model": "compression.convert", "export_hf": "compression.convert",
         "load_model": "models.loading",
         "RBEAttention": "layers", "RBEEmbedding": "layers", "RBEFFN": "layers", "RBELinear": "layers",
         "RBETensor": "tensor", "finetune": "training.finetuning", "quantize": "hf.quantize"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'rbe_core' has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "Backend",
    "BackendUnavailableError",
    "ChecksumError",
    "Codec",
    "DerivativeEngine",
    "Encoded",
    "Geometry",
    "InvalidWeightError",
    "Quantizer",
    "RBEError",
    "RBEFile",
    "RBEFormatError",
    "UnknownCodecError",
    "RBEAttention",
    "RBEEmbedding",
    "RBEFFN",
    "RBELinear",
    "RBETensor",
    "compress_model",
    "export_hf",
    "finetune",
    "get_backend",
    "get_codec",
    "hookimpl",
    "list_backends",
    "list_codecs",
    "load_model",
    "open",
    "quantize",
    "registry",
    "reload_plugins",
    "report",
    "save",
]

# transformers/PEFT load rbe folders and dispatch rbe layers once they are imported
_autoregister.install()
