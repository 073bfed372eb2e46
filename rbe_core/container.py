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
import contextlib
import ctypes
import json
import mmap
import os
import struct
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors

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


#: numpy dtype -> safetensors dtype code, in the order safetensors itself lays tensors out
#: (descending alignment, so every tensor stays aligned when the data section starts 8-aligned).
_ST_DTYPES = {np.dtype(t): code for t, code in [
    ("uint64", "U64"), ("int64", "I64"), ("float64", "F64"), ("complex64", "C64"), ("float32", "F32"),
    ("uint32", "U32"), ("int32", "I32"), ("float16", "F16"), ("uint16", "U16"), ("int16", "I16"),
    ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL")]}
_ST_RANK = {code: i for i, code in enumerate(_ST_DTYPES.values())}
_COPY_CHUNK = 4 << 20


def _remove(fh, *paths: Path) -> None:
    if fh is not None:
        fh.close()
    for p in paths:
        p.unlink(missing_ok=True)


def _drop_cached(fd: int) -> None:
    """Drop a written (and synced) file's pages from the page cache where the OS allows: the
    writes left them in small pieces, and a reader that maps the file afresh gets them in huge
    pages (see ``_mapped_views``)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _copy_range(src_fd: int, dst, offset: int, length: int) -> None:
    """Append ``length`` bytes of ``src_fd`` starting at ``offset`` to the file object ``dst``."""
    while length > 0:
        chunk = os.pread(src_fd, min(length, _COPY_CHUNK), offset)
        if not chunk:
            raise OSError(f"spill file ended {length} bytes early")
        dst.write(chunk)
        offset += len(chunk)
        length -= len(chunk)


class Writer:
    """Streams encoded tensors into an .rbe file without holding them in memory.

    ``add(name, value)`` appends the payload bytes of one tensor (an ``Encoded``, or an array
    stored with the ``raw`` codec) to a hidden spill file next to ``path`` and keeps only its
    small header. ``close()`` writes the safetensors file (header, then the payloads copied from
    the spill file in safetensors' own order), fsyncs it and renames it onto ``path``. The user
    metadata can be given to the constructor, updated through ``.metadata`` at any time, or passed
    to ``close()`` (a converter knows it only at the end).

    As a context manager the writer closes on a normal exit and aborts on any exception
    (KeyboardInterrupt included): nothing is left at ``path`` or in its directory. Duplicate names
    raise ``ValueError``; a writer that was closed or aborted refuses further use.
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._headers: dict[str, dict[str, Any]] = {}
        self._entries: list[tuple[str, str, tuple[int, ...], int, int]] = []  # key, code, shape, at, n
        self._keys: set[str] = set()
        self._size = 0
        fd, spill = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".spill", dir=self.path.parent)
        self._spill_path = Path(spill)
        self._spill = builtins.open(fd, "wb")
        self._tmp = self._spill_path.with_suffix(".tmp")
        self._cleanup = weakref.finalize(self, _remove, self._spill, self._spill_path, self._tmp)

    @property
    def closed(self) -> bool:
        return not self._cleanup.alive

    def __len__(self) -> int:
        return len(self._headers)

    def __contains__(self, name: object) -> bool:
        return name in self._headers

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"writer for {self.path} is closed")

    def add(self, name: str, value) -> None:
        """Append tensor ``name``; its payload goes to disk now and is not kept."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if name in self._headers:
            raise ValueError(f"duplicate tensor name {name!r}")
        enc = _as_encoded(name, value)
        arrays = {f"{name}/{field}": np.ascontiguousarray(arr) for field, arr in enc.payload.items()}
        for key, arr in arrays.items():
            if key in self._keys:
                raise ValueError(f"payload key {key!r} of tensor {name!r} collides with an earlier tensor")
            if arr.dtype.newbyteorder("=") not in _ST_DTYPES:
                raise TypeError(f"tensor {name!r}: payload dtype {arr.dtype} cannot be stored in safetensors")
        header = enc.header(plugin=codec_plugin(enc.codec.codec_id))
        entries, at = [], self._size
        try:
            for key, arr in arrays.items():
                self._spill.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8))
                entries.append((key, _ST_DTYPES[arr.dtype.newbyteorder("=")], arr.shape, at, arr.nbytes))
                at += arr.nbytes
        except BaseException:
            self._spill.seek(self._size)  # drop this tensor's partial bytes; the writer stays usable
            self._spill.truncate()
            raise
        self._entries += entries
        self._keys.update(arrays)
        self._size = at
        self._headers[name] = header

    def _header_bytes(self) -> tuple[bytes, list[tuple[str, str, tuple[int, ...], int, int]]]:
        meta = {
            "rbe.format": FORMAT_VERSION,
            "rbe.tensors": json.dumps(self._headers, sort_keys=True),
            "rbe.metadata": json.dumps(self.metadata, sort_keys=True),
        }
        order = sorted(self._entries, key=lambda e: (_ST_RANK[e[1]], e[0]))
        header: dict[str, Any] = {"__metadata__": meta}
        offset = 0
        for key, code, shape, _, n in order:
            header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        return blob + b" " * (-len(blob) % 8), order

    def close(self, metadata: Mapping[str, Any] | None = None, *, check=None) -> Path:
        """Write the file and rename it onto ``path``; return ``path``.

        ``metadata`` (when given) replaces ``.metadata``. ``check(tmp_path)``, when given, is called
        with the complete temporary file before the rename; if it raises, nothing is written.
        """
        self._check_open()
        try:
            if metadata is not None:
                self.metadata = dict(metadata)
            blob, order = self._header_bytes()
            self._spill.flush()
            src = self._spill.fileno()
            with builtins.open(self._tmp, "xb") as out:
                out.write(struct.pack("<Q", len(blob)))
                out.write(blob)
                for _, _, _, at, n in order:
                    _copy_range(src, out, at, n)
                out.flush()
                os.fsync(out.fileno())
                _drop_cached(out.fileno())
            os.chmod(self._tmp, 0o666 & ~_UMASK)
            if check is not None:
                check(self._tmp)
            os.replace(self._tmp, self.path)
        finally:
            self._cleanup()
        return self.path

    def abort(self) -> None:
        """Discard everything written so far (idempotent)."""
        self._cleanup()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.closed:
            self.close()


def save(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``tensors`` (name -> Encoded, or a plain array stored with the ``raw`` codec) atomically.

    The file appears at ``path`` only when complete (see ``Writer``); an interrupted write leaves
    nothing behind.
    """
    with Writer(path, metadata) as writer:
        for name, value in tensors.items():
            writer.add(name, value)
    return writer.path


def _parse_headers(raw: Mapping[str, str] | None, keys: set[str]) -> tuple[dict[str, dict], str]:
    """(tensor headers, the user metadata's JSON text), both checked."""
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
    return headers, raw.get("rbe.metadata", "{}")


_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
           "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


_PAGE = mmap.PAGESIZE


def trim_heap() -> None:
    """Hand the C heap's freed memory back to the system (glibc's ``malloc_trim``; elsewhere
    nothing): after loading, the parsed metadata and a tokenizer's build leave tens of MB freed
    but resident."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release(*arrays: np.ndarray) -> None:
    """Drop the resident pages under read-only views of a mapped .rbe file (clean file pages: the
    next access reads them again), so a tensor that was read once (checksummed, or copied into a
    native engine) does not stay in the process's memory. Other arrays are left alone."""
    for arr in arrays:
        base = arr
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        if isinstance(base, memoryview):
            base = base.obj
        if not isinstance(base, mmap.mmap) or arr.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            continue
        start = arr.__array_interface__["data"][0] - np.frombuffer(base, np.uint8, count=1).__array_interface__["data"][0]
        lo, hi = start // _PAGE * _PAGE, min(len(base), -(-(start + arr.nbytes) // _PAGE) * _PAGE)
        base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _mapped_views(path: Path):
    """name -> read-only numpy view of that tensor in the memory-mapped safetensors file (whose
    header ``safetensors.safe_open`` has already validated)."""
    with builtins.open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else None
    if mm is None:
        raise RBEFormatError(f"{path}: empty file")
    if hasattr(mmap, "MADV_HUGEPAGE"):  # pages read from here on come in 2 MB pages where the kernel
        with contextlib.suppress(OSError):  # can: the native engine streams codes in place
            mm.madvise(mmap.MADV_HUGEPAGE)
    (n,) = struct.unpack("<Q", mm[:8])
    index = json.loads(mm[8:8 + n])

    def view(key: str) -> np.ndarray:
        entry = index[key]
        start, stop = entry["data_offsets"]
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        arr = np.frombuffer(mm, dtype=dtype, count=(stop - start) // dtype.itemsize, offset=8 + n + start)
        return arr.reshape(entry["shape"])

    return view


class TensorFile(Mapping):
    """The read interface of stored models: tensor name -> ``Encoded`` over ``headers`` (name -> the
    tensor's JSON header), with ``metadata``, ``status`` and ``close`` (also as a context manager).
    Subclasses implement ``__getitem__`` and ``close``."""

    headers: dict[str, dict]
    metadata: dict

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
        """Release the underlying files."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RBEFile(TensorFile):
    """A lazily decoded .rbe file: a mapping tensor name -> ``Encoded``.

    Payload arrays are read-only views of the memory-mapped file (no copy: a model's weights
    are resident once, as file pages); each access verifies the checksum (``ChecksumError``) and
    the codec's payload checks (``RBEFormatError``).
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
        self.headers, self._metadata_json = _parse_headers(raw_meta, keys)
        self._views = _mapped_views(self.path)

    @property
    def metadata(self) -> dict:
        """The user metadata, parsed anew on each access: with a tokenizer inside it is megabytes
        of Python objects, which then live only as long as their user holds them."""
        return json.loads(self._metadata_json)

    def __getitem__(self, name: str) -> Encoded:
        h = self.headers[name]
        codec = get_codec(h["codec"], plugin=h["plugin"])
        try:
            payload = {f: self._views(f"{name}/{f}") for f in h["fields"]}
        except Exception as exc:
            raise RBEFormatError(f"tensor {name!r}: cannot read payload: {exc}") from exc
        enc = Encoded(codec=codec, shape=tuple(h["shape"]), payload=payload, dtype=h["dtype"], source=h["source"])
        if enc.checksum != h["sha256"]:
            raise ChecksumError(f"tensor {name!r}: checksum mismatch (file is corrupt or was modified)")
        codec.validate(enc)
        release(*payload.values())  # read for the checksum; resident again only when used
        return enc

    def close(self) -> None:
        self._file = self._views = None

