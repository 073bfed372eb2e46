"""Kernels in torch ops (CPU or CUDA): row-chunked decode inside the matmul.

``ROW_DECODERS`` holds the codecs decoded natively on the device; any other codec decodes its
rows with the codec's own numpy ``decode_rows`` and copies them over (logged once per codec).
"""

from __future__ import annotations

import logging
import weakref

import numpy as np
import torch

from rbe_core.abc import Encoded
from rbe_core.arrays import row_chunks

log = logging.getLogger("rbe")

_DEVICE_PAYLOADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WARNED: set[str] = set()


def _int8_rows(p, start, stop):
    return p["q"][start:stop].float() * p["scale"][start:stop, None]


def _raw_rows(p, start, stop, cols):
    return p["data"].view(-1, cols)[start:stop].float()


ROW_DECODERS = {
    "int8": lambda p, s, e, cols: _int8_rows(p, s, e),
    "raw": _raw_rows,
}


def device_payload(encoded: Encoded, device: torch.device) -> dict[str, torch.Tensor]:
    """The payload arrays as tensors on ``device``, copied once per (encoded tensor, device)."""
    per_device = _DEVICE_PAYLOADS.setdefault(encoded, {})
    key = str(device)
    if key not in per_device:
        per_device[key] = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in encoded.payload.items()}
    return per_device[key]


def decode_rows(encoded: Encoded, start: int, stop: int, device: torch.device) -> torch.Tensor:
    rows, cols = encoded.matrix_shape
    codec_id = encoded.codec.codec_id
    fn = ROW_DECODERS.get(codec_id)
    if fn is not None:
        return fn(device_payload(encoded, device), start, stop, cols)
    if codec_id not in _WARNED:
        _WARNED.add(codec_id)
        log.info("rbe torch backend: no native kernel for %r; decoding rows with the codec's numpy path", codec_id)
    return torch.from_numpy(encoded.decode_rows(start, stop)).to(device)


def linear(x: torch.Tensor, encoded: Encoded) -> torch.Tensor:
    """(n, in) @ W.T -> (n, out), float32 on x's device."""
    rows, cols = encoded.matrix_shape
    out = torch.empty((x.shape[0], rows), dtype=torch.float32, device=x.device)
    for start, stop in row_chunks(rows, cols):
        torch.matmul(x, decode_rows(encoded, start, stop, x.device).T, out=out[:, start:stop])
    return out


def grad_input(grad_out: torch.Tensor, encoded: Encoded) -> torch.Tensor:
    """(n, out) @ W -> (n, in)."""
    rows, cols = encoded.matrix_shape
    out = torch.zeros((grad_out.shape[0], cols), dtype=torch.float32, device=grad_out.device)
    for start, stop in row_chunks(rows, cols):
        out.addmm_(grad_out[:, start:stop], decode_rows(encoded, start, stop, grad_out.device))
    return out
