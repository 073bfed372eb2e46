"""Kernels in torch ops (CPU or CUDA): row-chunked decode inside the matmul.

Memory budget: a call materialises at most ``chunk_elements(device)`` decoded float32 weights
at once (``RBE_TORCH_CHUNK_MB`` MiB of float32, default 4 MiB on CPU, where a chunk that stays
in cache is fastest, and 64 MiB on CUDA, where fewer and larger launches win), never the whole
weight. Per-(tensor, device) prepared payloads are cached: the codes themselves (shared with
the numpy payload on CPU, copied once to a GPU) plus float32 scales and minima.

Native codecs: ``int8`` computes ``(x @ q.T) * scale`` (the scale leaves the inner loop);
``int4`` splits each chunk into its even and odd columns (low and high nibbles), so
``y = x_even @ (lo * s).T + x_odd @ (hi * s).T + group_sums(x) @ minimum.T`` needs one
promoting multiply per half and no interleaving copy; ``raw`` reads the stored floats;
``hadamard`` (only the layout ``rbe_backends.numpy.hadamard.native`` recognises) rotates the
input once with a torch FWHT and multiplies chunks of the rotated weight ``levels[q] * step``
unpacked from the bit streams, and its ``grad_input`` applies the inverse rotation to
``g @ W_rot``. Any other
codec decodes rows with its numpy ``decode_rows`` and copies them over (logged once per codec).
``decode_rows`` is exact (the codec's own float32 arithmetic, in the same order).
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from rbe_backends.numpy import hadamard as had
from rbe_core.abc import Encoded

log = logging.getLogger("rbe")

CHUNK_ENV = "RBE_TORCH_CHUNK_MB"
#: Default decoded-weight budget per call in MiB of float32, by device type.
DEFAULT_CHUNK_MB = {"cpu": 4, "cuda": 64}

_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WARNED: set[str] = set()


def chunk_elements(device: torch.device) -> int:
    """Decoded float32 weights one call may hold at once on ``device`` (``$RBE_TORCH_CHUNK_MB``)."""
    value = os.environ.get(CHUNK_ENV, "").strip()
    if value:
        try:
            mb = float(value)
        except ValueError:
            mb = -1.0
        if not mb > 0:
            raise ValueError(f"{CHUNK_ENV}={value!r}: expected a positive number of MiB")
    else:
        mb = DEFAULT_CHUNK_MB.get(device.type, DEFAULT_CHUNK_MB["cuda"])
    return max(1, int(mb * (1 << 20)) // 4)


def row_steps(rows: int, cols: int, device: torch.device):
    """(start, stop) row ranges whose decoded float32 size fits the device's budget."""
    step = max(1, chunk_elements(device) // max(cols, 1))
    return [(s, min(rows, s + step)) for s in range(0, rows, step)]


def _t(a: np.ndarray, device: torch.device) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # a read-only view of the mapped .rbe file: these tensors are only read
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(a).to(device)
    return torch.from_numpy(a).to(device)


def _prep_int8(enc: Encoded, device: torch.device) -> dict[str, torch.Tensor]:
    return {"q": _t(enc.payload["q"], device), "scale": _t(enc.payload["scale"], device)}


def _prep_int4(enc: Encoded, device: torch.device) -> dict[str, torch.Tensor]:
    p, gs = enc.payload, int(enc.codec.group_size)
    rows = enc.matrix_shape[0]
    groups = p["scale"].shape[1]
    return {
        "q": _t(p["q"], device).view(rows, groups, gs // 2),
        "scale": _t(p["scale"].astype(np.float32), device).unsqueeze(-1),
        "minimum": _t(p["minimum"].astype(np.float32), device).unsqueeze(-1),
    }


def _prep_raw(enc: Encoded, device: torch.device) -> dict[str, torch.Tensor]:
    return {"data": _t(enc.payload["data"], device).view(enc.matrix_shape)}


def _int8_rows(p, start, stop, cols):
    return p["q"][start:stop].float().mul_(p["scale"][start:stop, None])


def _int4_rows(p, start, stop, cols):
    q = p["q"][start:stop]
    w = torch.stack((q & 15, q >> 4), -1).flatten(-2).float()
    return w.mul_(p["scale"][start:stop]).add_(p["minimum"][start:stop]).flatten(1)[:, :cols]


def _raw_rows(p, start, stop, cols):
    return p["data"][start:stop].float()


def _buffer(steps, width: int, like: torch.Tensor) -> torch.Tensor:
    """One float32 scratch chunk reused by every step of a call (a fresh allocation per chunk
    costs page faults that can exceed the arithmetic on CPU)."""
    return torch.empty(max(e - s for s, e in steps) * width, dtype=torch.float32, device=like.device)


def _int8_linear(x, p, steps, out):
    q, scale = p["q"], p["scale"]
    buf = _buffer(steps, q.shape[1], x)
    for s, e in steps:
        w = buf[: (e - s) * q.shape[1]].view(e - s, -1).copy_(q[s:e])
        o = out[:, s:e]
        if o.is_contiguous():  # batch 1: straight into the output
            torch.mm(x, w.T, out=o)
        else:
            o.copy_(x @ w.T)
        o.mul_(scale[s:e])


def _int4_linear(x, p, steps, out):
    rows, groups, half = p["q"].shape
    cols_p = 2 * groups * half
    # zero inputs for the padding columns, so their (near-zero) decoded weights add nothing
    x = F.pad(x, (0, cols_p - x.shape[1])) if x.shape[1] != cols_p else x.contiguous()
    xg = x.view(-1, groups, half, 2)
    x_lo, x_hi = xg[..., 0].flatten(1), xg[..., 1].flatten(1)
    # the minimum term for every row at once: (n, groups) group sums @ minimum.T
    torch.matmul(xg.sum((2, 3)), p["minimum"].squeeze(-1).T, out=out)
    buf = _buffer(steps, groups * half, x)
    for s, e in steps:
        q, scale, o = p["q"][s:e], p["scale"][s:e], out[:, s:e]
        w = buf[: (e - s) * groups * half].view(e - s, groups, half)
        o.addmm_(x_lo, w.copy_(q & 15).mul_(scale).view(e - s, -1).T)
        o.addmm_(x_hi, w.copy_(q >> 4).mul_(scale).view(e - s, -1).T)


def _int8_grad(g, p, steps, out):
    q, scale = p["q"], p["scale"]
    buf = _buffer(steps, q.shape[1], g)
    for s, e in steps:
        w = buf[: (e - s) * q.shape[1]].view(e - s, -1).copy_(q[s:e])
        out.addmm_(g[:, s:e] * scale[s:e], w)


def _prep_had(enc: Encoded, device: torch.device) -> dict:
    cols_p, signs, blocks, levels = had.layout(enc)
    p, bits = enc.payload, int(enc.codec.bits)
    codes = _t(p["codes"], device)
    if bits not in (2, 4, 8):  # bit positions of each code: byte index and shift in a 16-bit window
        pos = torch.arange(cols_p, device=device) * bits
        codes = torch.cat((codes, codes.new_zeros((codes.shape[0], 1))), 1)  # the window's 2nd byte
        codes = {"bytes": codes, "index": pos >> 3, "shift": (pos & 7).to(torch.int16)}
    return {
        "codes": codes,
        "step": _t(p["row_scale"], device)[:, None] * _t(p["scale_code"], device).float(),
        "signs": _t(signs, device),
        "levels": _t(levels, device),
        # 4-bit: the level of each byte's low and of its high nibble, indexed by the byte itself
        "nibble_levels": tuple(_t(levels[nib], device) for nib in (np.arange(256) & 15, np.arange(256) >> 4))
        if bits == 4 else None,
        "factors": hadamard_factors(blocks, device),
        "cols_p": cols_p,
        "bits": bits,
        "gs": int(enc.codec.group_size),
    }


def _had_codes(p, start, stop) -> torch.Tensor:
    """uint8 (or int16) codes of rows ``start:stop``, (stop - start, cols_p)."""
    bits, codes, cols_p = p["bits"], p["codes"], p["cols_p"]
    if bits == 8:
        return codes[start:stop]
    if bits in (4, 2):
        c = codes[start:stop]
        parts = [(c >> s) & ((1 << bits) - 1) for s in range(0, 8, bits)]
        return torch.stack(parts, -1).flatten(1)[:, :cols_p]
    b = codes["bytes"][start:stop]
    lo, hi = b[:, codes["index"]].to(torch.int16), b[:, codes["index"] + 1].to(torch.int16)
    return ((lo | (hi << 8)) >> codes["shift"]) & ((1 << bits) - 1)


def _had_rot_rows(p, start, stop, out=None) -> torch.Tensor:
    """Rows ``start:stop`` of ``W_rot`` (float32, cols_p wide), into ``out`` when given."""
    q = _had_codes(p, start, stop).int().flatten()
    flat = None if out is None else out.view(-1)
    w = torch.index_select(p["levels"], 0, q, out=flat).view(stop - start, -1)
    w.view(stop - start, -1, p["gs"]).mul_(p["step"][start:stop, :, None])
    return w


def _sylvester(m: int, device: torch.device) -> torch.Tensor:
    h = torch.ones((1, 1), dtype=torch.float32)
    while h.shape[0] < m:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h.to(device)


def hadamard_factors(blocks: list[int], device: torch.device) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per block b = b1 * b2: Sylvester ``H_b1`` and ``H_b2 / sqrt(b)`` (``H_b = H_b1 ⊗ H_b2``)."""
    out = []
    for b in blocks:
        b1 = 1 << ((b.bit_length() - 1) // 2)
        out.append((b, _sylvester(b1, device), _sylvester(b // b1, device) * (1.0 / b**0.5)))
    return out


def fwht_blocks(x: torch.Tensor, factors) -> torch.Tensor:
    """Orthonormal block-diagonal Walsh–Hadamard transform along the last axis of (n, cols_p):
    each block as two small matmuls, ``H_b1 @ X @ H_b2`` on the block viewed as (b1, b2)."""
    parts, start = [], 0
    for b, h1, h2 in factors:
        y = x[:, start : start + b].reshape(x.shape[0], h1.shape[0], -1)
        parts.append(torch.matmul(h1, y @ h2).reshape(x.shape[0], b))
        start += b
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def _had_rows(p, start, stop, cols):
    return (fwht_blocks(_had_rot_rows(p, start, stop), p["factors"]) * p["signs"])[:, :cols]


def _had_steps(p, steps, device):
    """Row chunks within budget at the padded width; the level lookup holds int32 indices (the
    size of the float32 chunk) and the general (3, 5, 6, 7-bit) unpack int16 temporaries (twice more)."""
    return row_steps(steps[-1][1], p["cols_p"] * (2 if p["bits"] in (2, 4, 8) else 4), device)


def _had4_halves(p, s, e, buf):
    """Rows ``s:e`` of ``W_rot``'s even and odd columns (low, high nibbles), one after the other in
    ``buf`` (no interleaving copy); each is (e - s, cols_p / 2)."""
    idx = p["codes"][s:e].flatten().int()
    step = p["step"][s:e, :, None]
    for table in p["nibble_levels"]:
        w = torch.index_select(table, 0, idx, out=buf[: idx.numel()])
        yield w.view(e - s, -1, p["gs"] // 2).mul_(step).view(e - s, -1)


def _had_linear(x, p, steps, out):
    cols_p = p["cols_p"]
    xp = F.pad(x, (0, cols_p - x.shape[1])) if x.shape[1] != cols_p else x
    xr = fwht_blocks(xp * p["signs"], p["factors"])
    steps = _had_steps(p, steps, x.device)
    if p["bits"] == 4:
        halves = (xr[:, 0::2].contiguous(), xr[:, 1::2].contiguous())
        buf = _buffer(steps, cols_p // 2, x)
        out.zero_()
        for s, e in steps:
            for xh, w in zip(halves, _had4_halves(p, s, e, buf), strict=True):
                out[:, s:e].addmm_(xh, w.T)
        return
    buf = _buffer(steps, cols_p, x)
    for s, e in steps:
        w = _had_rot_rows(p, s, e, buf[: (e - s) * cols_p].view(e - s, cols_p))
        o = out[:, s:e]
        if o.is_contiguous():  # batch 1: straight into the output
            torch.mm(xr, w.T, out=o)
        else:
            o.copy_(xr @ w.T)


def _had_grad(g, p, steps, out):
    cols_p, n = p["cols_p"], g.shape[0]
    steps = _had_steps(p, steps, g.device)
    if p["bits"] == 4:
        lo, hi = (torch.zeros((n, cols_p // 2), dtype=torch.float32, device=g.device) for _ in range(2))
        buf = _buffer(steps, cols_p // 2, g)
        for s, e in steps:
            for a, w in zip((lo, hi), _had4_halves(p, s, e, buf), strict=True):
                a.addmm_(g[:, s:e], w)
        acc = torch.stack((lo, hi), -1).view(n, cols_p)
    else:
        acc = torch.zeros((n, cols_p), dtype=torch.float32, device=g.device)
        buf = _buffer(steps, cols_p, g)
        for s, e in steps:
            acc.addmm_(g[:, s:e], _had_rot_rows(p, s, e, buf[: (e - s) * cols_p].view(e - s, cols_p)))
    out.copy_((fwht_blocks(acc, p["factors"]) * p["signs"])[:, : out.shape[1]])


#: codec id -> (prepare payload for a device, exact row decoder, fused linear or None, grad or None)
KERNELS: dict[str, tuple[Callable, Callable, Callable | None, Callable | None]] = {
    "int8": (_prep_int8, _int8_rows, _int8_linear, _int8_grad),
    "int4": (_prep_int4, _int4_rows, _int4_linear, None),
    "raw": (_prep_raw, _raw_rows, None, None),
    "hadamard": (_prep_had, _had_rows, _had_linear, _had_grad),
}


def kernel_for(encoded: Encoded):
    """The ``KERNELS`` entry for ``encoded``, or None (hadamard: only the layout we know)."""
    codec_id = encoded.codec.codec_id
    if codec_id == had.CODEC_ID and not had.native(encoded):
        return None
    return KERNELS.get(codec_id)


def prepared(encoded: Encoded, device: torch.device) -> dict[str, torch.Tensor]:
    """The codec's payload as tensors ready for its kernels on ``device``, built once per pair."""
    per_device = _PREPARED.setdefault(encoded, {})
    key = str(device)
    if key not in per_device:
        per_device[key] = KERNELS[encoded.codec.codec_id][0](encoded, device)
    return per_device[key]


def decode_rows(encoded: Encoded, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` of the (rows, cols) weight as float32 on ``device``."""
    codec_id = encoded.codec.codec_id
    kernel = kernel_for(encoded)
    if kernel is not None:
        return kernel[1](prepared(encoded, device), start, stop, encoded.matrix_shape[1])
    if codec_id not in _WARNED:
        _WARNED.add(codec_id)
        log.info("rbe torch backend: no native kernel for %r; decoding rows with the codec's numpy path", codec_id)
    return torch.from_numpy(encoded.decode_rows(start, stop)).to(device)


def linear(x: torch.Tensor, encoded: Encoded) -> torch.Tensor:
    """(n, in) @ W.T -> (n, out), float32 on x's device."""
    rows, cols = encoded.matrix_shape
    out = torch.empty((x.shape[0], rows), dtype=torch.float32, device=x.device)
    steps = row_steps(rows, cols, x.device)
    kernel = kernel_for(encoded)
    if kernel is not None and kernel[2] is not None:
        kernel[2](x, prepared(encoded, x.device), steps, out)
        return out
    for s, e in steps:
        torch.matmul(x, decode_rows(encoded, s, e, x.device).T, out=out[:, s:e])
    return out


def grad_input(grad_out: torch.Tensor, encoded: Encoded) -> torch.Tensor:
    """(n, out) @ W -> (n, in)."""
    rows, cols = encoded.matrix_shape
    out = torch.zeros((grad_out.shape[0], cols), dtype=torch.float32, device=grad_out.device)
    steps = row_steps(rows, cols, grad_out.device)
    kernel = kernel_for(encoded)
    if kernel is not None and kernel[3] is not None:
        kernel[3](grad_out, prepared(encoded, grad_out.device), steps, out)
        return out
    for s, e in steps:
        out.addmm_(grad_out[:, s:e], decode_rows(encoded, s, e, grad_out.device))
    return out
