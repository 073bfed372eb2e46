"""Typed errors. Every failure the library reports on bad input is an ``RBEError``."""

from __future__ import annotations


class RBEError(Exception):
    """Base class of every error rbe raises on purpose."""


class RBEFormatError(RBEError, ValueError):
    """A file or payload is not a valid .rbe container (truncated, malformed, inconsistent)."""


class ChecksumError(RBEFormatError):
    """A tensor's stored bytes do not match the checksum written with them."""


class UnknownCodecError(RBEError, KeyError):
    """No registered plugin provides the requested codec id.

    ``plugin`` names the distribution that wrote the data, when the file recorded it.
    """

    def __init__(self, codec_id: str, plugin: str | None = None, known: tuple[str, ...] = ()):
        self.codec_id = codec_id
        self.plugin = plugin
        hint = f"; it was written by plugin distribution {plugin!r} (pip install {plugin})" if plugin else ""
        known_txt = f" Registered codecs: {', '.join(known)}." if known else ""
        super().__init__(f"unknown codec {codec_id!r}{hint}.{known_txt}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class BackendUnavailableError(RBEError, RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


class NativeUnavailableError(RBEError):
    """A model cannot run on a backend's native engine (no engine, or a tensor without a layout
    the engine knows); callers fall back to the torch modules. The message says why."""


class InvalidWeightError(RBEError, ValueError):
    """A weight cannot be encoded as given (NaN/inf, wrong rank, empty, unsupported dtype)."""
