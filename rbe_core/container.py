"""The .rbe container: a safetensors file whose metadata describes each encoded tensor.

Layout (see docs/format.md): payload arrays are stored as safetensors tensors named
``<tensor name>/<field>``; the safetensors ``__metadata__`` holds

- ``rbe.format``: the format version (``"1"``),
- ``rbe.tensors``: JSON ``{name: {codec, plugin, shape, dtype, source, fields, sha256}}``,
- ``rbe.metadata``: JSON of the caller's metadata (model config, tokenizer, ...).

No pickle anywhere; reading memory-maps the file and decodes lazily, tensor by tensor.
"""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from .abc import Encoded
from .errors import ChecksumError, RBEError, RBEFormatError
from .registry import codec_plugin, get_codec

FORMAT_VERSION = "1"
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it) and restored
os.umask(_UMASK)
_HEADER_KEYS = {"codec": dict, "plugin": (str, type(None)), "shape": list, "dtype": str,
                "source": str, "fields": list, "sha256": str}


def _as_encoded(name: str, value) -> Encoded:
    if isinstance(value, Encoded):
        return value
    if isinstance(value, np.ndarray) or hasattr(value, "detach"):
        return get_codec("raw").encode(value, source=name)
    raise TypeError(f"tensor {name!r}: expected an Encoded value or an array, got {type(value).__name__}")


def save(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``tensors`` (name -> Encoded, or a plain array stored with the ``raw`` codec) atomically.

    The file appears at ``path`` only when complete: it is written to a temporary file in the
    same directory and renamed; an interrupted write leaves nothing behind.
    """
    path = Path(path)
    headers: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        enc = _as_encoded(name, value)
        headers[name] = enc.header(plugin=codec_plugin(enc.codec.codec_id))
        for field, arr in enc.payload.items():
            arrays[f"{name}/{field}"] = np.ascontiguousarray(arr)
    meta = {
        "rbe.format": FORMAT_VERSION,
        "rbe.tensors": json.dumps(headers, sort_keys=True),
        "rbe.metadata": json.dumps(dict(metadata or {}), sort_keys=True),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.numpy.save_file(arrays, str(tmp), metadata=meta)
        with builtins.open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors creates 0600 files; follow the umask like open()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _parse_headers(raw: Mapping[str, str] | None, keys: set[str]) -> tuple[dict[str, dict], dict]:
    raw = raw or {}
    version = raw.get("rbe.format")
    if version is None:
        raise RBEFormatError("not an .rbe file: safetensors metadata has no 'rbe.format'")
    if version != FORMAT_VERSION:
        raise RBEFormatError(f"unsupported .rbe format version {version!r} (this rbe reads {FORMAT_VERSION!r})")
    try:
        headers = json.loads(raw.get("rbe.tensors", ""))
        user = json.loads(raw.get("rbe.metadata", "{}"))
    except (json.JSONDecodeError, TypeError) as exc:
        raise RBEFormatError(f"corrupt .rbe metadata: {exc}") from exc
    if not isinstance(headers, dict) or not isinstance(user, dict):
        raise RBEFormatError("corrupt .rbe metadata: 'rbe.tensors' and 'rbe.metadata' must be JSON objects")
    expected: set[str] = set()
    for name, h in headers.items():
        if not isinstance(h, dict):
            raise RBEFormatError(f"tensor {name!r}: header is not an object")
        for key, typ in _HEADER_KEYS.items():
            if key not in h or not isinstance(h[key], typ):
                raise RBEFormatError(f"tensor {name!r}: header field {key!r} missing or of the wrong type")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in h["shape"]):
            raise RBEFormatError(f"tensor {name!r}: shape {h['shape']!r} is not a list of non-negative ints")
        if not all(isinstance(f, str) for f in h["fields"]):
            raise RBEFormatError(f"tensor {name!r}: fields must be strings")
        expected.update(f"{name}/{f}" for f in h["fields"])
    if expected != keys:
        missing, extra = sorted(expected - keys)[:3], sorted(keys - expected)[:3]
        raise RBEFormatError(f"payload tensors do not match the header (missing {missing}, unexpected {extra})")
    return headers, user


class RBEFile(Mapping):
    """A lazily decoded .rbe file: a mapping tensor name -> ``Encoded``.

    Payload bytes are read from the memory-mapped file on access; each access verifies the
    checksum (``ChecksumError``) and the codec's payload checks (``RBEFormatError``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = safetensors.safe_open(str(self.path), framework="numpy")
            keys = set(self._file.keys())
            raw_meta = self._file.metadata()
        except FileNotFoundError:
            raise
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise RBEFormatError(f"{self.path}: not a readable safetensors/.rbe file: {exc}") from exc
        self.headers, self.metadata = _parse_headers(raw_meta, keys)

    def __getitem__(self, name: str) -> Encoded:
        h = self.headers[name]
        codec = get_codec(h["codec"], plugin=h["plugin"])
        try:
            payload = {f: self._file.get_tensor(f"{name}/{f}") for f in h["fields"]}
        except Exception as exc:
            raise RBEFormatError(f"tensor {name!r}: cannot read payload: {exc}") from exc
        enc = Encoded(codec=codec, shape=tuple(h["shape"]), payload=payload, dtype=h["dtype"], source=h["source"])
        if enc.checksum != h["sha256"]:
            raise ChecksumError(f"tensor {name!r}: checksum mismatch (file is corrupt or was modified)")
        codec.validate(enc)
        return enc

    def __iter__(self) -> Iterator[str]:
        return iter(self.headers)

    def __len__(self) -> int:
        return len(self.headers)

    def status(self, name: str) -> str:
        """'ok', or the error message a read of ``name`` raises."""
        try:
            self[name]
        except RBEError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ok"

    def close(self) -> None:
        self._file = None

    def __enter__(self) -> RBEFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(path: str | os.PathLike) -> RBEFile:  # noqa: A001 - public API name, mirrors builtins.open
    """Open an .rbe file lazily. Raises ``RBEFormatError`` when it is not a valid container."""
    return RBEFile(path)
