"""rbe core: interfaces, plugin registry, the .rbe container and the public API.

    import rbe_core
    enc = rbe_core.get_codec("int8").encode(weight)
    rbe_core.save("model.rbe", {"w": enc})
    y = rbe_core.get_backend().linear(x, rbe_core.open("model.rbe")["w"])
"""

from .abc import Backend, Codec, DerivativeEngine, Encoded, Geometry, Quantizer
from .container import FORMAT_VERSION, RBEFile, open, save
from .errors import (
    BackendUnavailableError,
    ChecksumError,
    InvalidWeightError,
    RBEError,
    RBEFormatError,
    UnknownCodecError,
)
from .hookspecs import hookimpl
from .quality import report
from .registry import get_backend, get_codec, list_backends, list_codecs, registry, reload_plugins

__version__ = "0.1.0"

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
    "get_backend",
    "get_codec",
    "hookimpl",
    "list_backends",
    "list_codecs",
    "open",
    "registry",
    "reload_plugins",
    "report",
    "save",
]
