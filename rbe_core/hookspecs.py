"""pluggy hook specifications. A plugin module implements any of these with ``@hookimpl``.

Each hook receives a ``register`` callback; call it once per object the plugin provides:

    @hookimpl
    def rbe_register_codecs(register):
        register(MyCodec)          # a Codec subclass with a unique ``codec_id``
"""

from __future__ import annotations

import pluggy

PROJECT = "rbe"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: registry kind -> hook name; the kinds ``rbe plugins`` lists.
KINDS = {
    "codecs": "rbe_register_codecs",
    "geometries": "rbe_register_geometries",
    "backends": "rbe_register_backends",
    "engines": "rbe_register_derivative_engines",
    "quantizers": "rbe_register_quantizers",
    "kernels": "rbe_register_kernels",
}


@hookspec
def rbe_register_codecs(register):
    """Register ``Codec`` subclasses (keyed by their ``codec_id``)."""


@hookspec
def rbe_register_geometries(register):
    """Register geometry objects (keyed by their ``name``)."""


@hookspec
def rbe_register_backends(register):
    """Register ``Backend`` subclasses (keyed by their ``name``)."""


@hookspec
def rbe_register_derivative_engines(register):
    """Register ``DerivativeEngine`` subclasses (keyed by their ``name``)."""


@hookspec
def rbe_register_quantizers(register):
    """Register ``Quantizer`` subclasses (keyed by their ``name``)."""


@hookspec
def rbe_register_kernels(register):
    """Register ``Kernel`` subclasses: a codec's own ``linear``/``linear_grad_input`` on the
    backends it names (keyed ``codec_id@backend``); they take precedence over the backend's
    lowered and generic paths for that codec."""
