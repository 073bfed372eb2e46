"""Training forms (``rbe_core.training.TorchForm``) of the built-in codecs.

Each codec's ``torch_form()`` returns its entry of ``FORMS``; this module imports torch, so codecs
import it only when training asks for a form. Each form mirrors its codec's decode in torch (see the
codec modules for the layouts) and writes trained values back with the codec's own packing.

- ``int8``: ``scale`` (rows,).            - ``int4``: ``scale``, ``minimum`` (rows, groups).
- ``cyclic8``: ``scale`` (rows, groups).
- ``cyclic16``: ``scale``, per-weight ``amplitude`` (a/63) and ``phase`` (2πk/256) — a PhaseForm.
- ``packed64``/``packed128``: per-block ``r, omega_x, theta, omega_y, psi`` (+ ``dc``) — PhaseForms.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rbe_core.abc import Encoded
from rbe_core.arrays import matrix_shape
from rbe_core.training.forms import PhaseForm, TorchForm, as_numpy

from ._blocks import FLOAT16_MAX, code_entry, four_bit_payload, pack_nibbles, round_up

HALF_PI = np.pi / 2


def _tensor(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy()).to(like.device)


def _store(value, dtype: str) -> np.ndarray:
    """``value`` rounded to a float storage type, clipped to its finite range."""
    v = as_numpy(value)
    if dtype == "float16":
        v = np.clip(v, -FLOAT16_MAX, FLOAT16_MAX)
    return v.astype(dtype)


def _rebuild(encoded: Encoded, payload: dict) -> Encoded:
    new = Encoded(encoded.codec, encoded.shape, payload, dtype=encoded.dtype, source=encoded.source)
    encoded.codec.validate(new)
    return new


def _four_bit_codes(payload, like: torch.Tensor) -> torch.Tensor:
    """uint8 codes (rows, cols_p) on ``like``'s device from an ``int4`` payload's ``nibbles`` (nibble
    blocks: each block's low nibbles are its first 16 codes) or ``q`` (pairs of columns)."""
    if "nibbles" in payload:
        packed = _tensor(payload["nibbles"], like).reshape(len(payload["nibbles"]), -1, 1, 16)
        return torch.cat((packed & 15, packed >> 4), 2).reshape(packed.shape[0], -1)
    packed = _tensor(payload["q"], like)
    return torch.stack((packed & 15, packed >> 4), -1).reshape(packed.shape[0], -1)


def _groups(w2: torch.Tensor, group: int) -> torch.Tensor:
    """(rows, cols) -> (rows, groups, group), zero-padding the columns."""
    return F.pad(w2, (0, -w2.shape[1] % group)).reshape(w2.shape[0], -1, group)


class Int8Form(TorchForm):
    fields = ("scale",)
    row_wise = True
    step_dtype = "float32"

    def grid(self, encoded):
        return (8, True, None)

    def params(self, encoded):
        return {"scale": encoded.payload["scale"].astype(np.float64)}

    def decode(self, encoded, params):
        scale = params["scale"]
        return _tensor(encoded.payload["q"], scale).to(scale.dtype) * scale[:, None]

    def write(self, encoded, params):
        return _rebuild(encoded, {"q": encoded.payload["q"], "scale": _store(params["scale"], "float32")})

    def pack(self, encoded, codes, step, offset):
        rows, cols = encoded.matrix_shape
        q = np.asarray(codes).reshape(rows, -1)[:, :cols].astype(np.int8)
        return _rebuild(encoded, {"q": q, "scale": _store(step.reshape(rows), "float32")})


class Int4Form(TorchForm):
    fields = ("scale", "minimum")
    row_wise = True
    step_dtype = "float16"

    def grid(self, encoded):
        return (4, False, encoded.codec.group_size)

    def params(self, encoded):
        p = encoded.payload
        return {"scale": p["scale"].astype(np.float64), "minimum": p["minimum"].astype(np.float64)}

    def decode(self, encoded, params):
        scale, minimum = params["scale"], params["minimum"]
        q = _four_bit_codes(encoded.payload, scale).to(scale.dtype)
        g = encoded.codec.group_size
        w = q.reshape(q.shape[0], -1, g) * scale[..., None] + minimum[..., None]
        return w.reshape(q.shape[0], -1)[:, : encoded.matrix_shape[1]]

    def write(self, encoded, params):
        return _rebuild(encoded, {**code_entry(encoded.payload, "q"), "scale": _store(params["scale"], "float16"),
                                  "minimum": _store(params["minimum"], "float16")})

    def pack(self, encoded, codes, step, offset):
        rows = encoded.matrix_shape[0]
        q = four_bit_payload(np.asarray(codes).reshape(rows, -1).astype(np.uint8), "q", pack_nibbles)
        return _rebuild(encoded, {**q, "scale": _store(step.reshape(rows, -1), "float16"),
                                  "minimum": _store(offset.reshape(rows, -1), "float16")})


class LutScaleForm(TorchForm):
    """Table-driven group codes (``cyclic8``): the per-group float16 scales train, codes stay."""

    fields = ("scale",)
    row_wise = True

    def params(self, encoded):
        return {"scale": encoded.payload["scale"].astype(np.float64)}

    def decode(self, encoded, params):
        scale = params["scale"]
        lut = _tensor(encoded.codec.lut(), scale).to(scale.dtype)
        v = lut[_tensor(encoded.payload["code"].astype(np.int64), scale)]
        v = v.reshape(v.shape[0], -1, encoded.codec.group_size) * scale[..., None]
        return v.reshape(v.shape[0], -1)[:, : encoded.matrix_shape[1]]

    def write(self, encoded, params):
        return _rebuild(encoded, {"code": encoded.payload["code"], "scale": _store(params["scale"], "float16")})


class Cyclic16Form(PhaseForm):
    """``cyclic16`` as ``w = scale · amplitude · sin⁽ᵈ⁾(phase)`` with continuous amplitude and phase.

    Writing rounds amplitude to 6 bits (a negative amplitude flips the sign through d + 2) and
    phase to 8 bits; the decode table holds sin to 1/32767, so ``decode`` matches the codec's
    table decode to about 3e-5 of the scale.
    """

    fields = ("scale", "amplitude", "phase")
    row_wise = True

    @staticmethod
    def _split(code: np.ndarray):
        code = code.astype(np.int64)
        return code >> 10, (code >> 8) & 3, code & 255

    def params(self, encoded):
        amp, _, k = self._split(encoded.payload["code"])
        return {"scale": encoded.payload["scale"].astype(np.float64), "amplitude": amp / 63.0,
                "phase": k * (2 * np.pi / 256)}

    def terms(self, encoded, params):
        scale = params["scale"]
        g = encoded.codec.group_size
        order = _tensor(self._split(encoded.payload["code"])[1], scale)
        rows = scale.shape[0]
        coef = scale[..., None] * params["amplitude"].reshape(rows, -1, g)
        return [(coef, [(order.reshape(rows, -1, g), params["phase"].reshape(rows, -1, g))])]

    def place(self, encoded, v):
        return v.reshape(v.shape[0], -1)[:, : encoded.matrix_shape[1]]

    def gather(self, encoded, grad_w):
        return _groups(grad_w, encoded.codec.group_size)

    def write(self, encoded, params):
        _, d, _ = self._split(encoded.payload["code"])
        a = np.rint(as_numpy(params["amplitude"]) * 63.0).astype(np.int64)
        d = np.where(a < 0, d + 2, d) & 3
        a = np.clip(np.abs(a), 0, 63)
        k = np.rint(as_numpy(params["phase"]) * (256 / (2 * np.pi))).astype(np.int64) % 256
        code = ((a << 10) | (d << 8) | k).astype(np.uint16)
        return _rebuild(encoded, {"code": code, "scale": _store(params["scale"], "float16")})


class PackedForm(PhaseForm):
    """``packed64``/``packed128``: one separable atom per block,
    ``r · sin⁽ᵈʸ⁾(ω_y·i + ψ) · sin⁽ᵈˣ⁾(ω_x·j + θ) + dc``.

    Writing folds whole quarter turns of θ, ψ into the 2-bit orders d_x, d_y (and a negative r
    into d_y + 2), then packs with the codec's own bit layout.
    """

    def __init__(self, with_dc: bool):
        self.with_dc = with_dc
        self.fields = ("r", "omega_x", "theta", "omega_y", "psi") + (("dc",) if with_dc else ())

    def params(self, encoded):
        p = encoded.codec.unpack(encoded.payload["code"])
        return {f: p[f].astype(np.float64) for f in self.fields}

    def terms(self, encoded, params):
        p = encoded.codec.unpack(encoded.payload["code"])
        r = params["r"]
        t = torch.arange(encoded.codec.block, dtype=r.dtype, device=r.device)
        d_y, d_x = _tensor(p["d_y"], r)[:, None, None], _tensor(p["d_x"], r)[:, None, None]
        arg_y = params["omega_y"][:, None, None] * t[None, :, None] + params["psi"][:, None, None]
        arg_x = params["omega_x"][:, None, None] * t[None, None, :] + params["theta"][:, None, None]
        out = [(r[:, None, None], [(d_y, arg_y), (d_x, arg_x)])]
        if self.with_dc:
            out.append((params["dc"][:, None, None].expand(-1, len(t), len(t)), []))
        return out

    def _grid(self, encoded):
        rows, cols = matrix_shape(encoded.shape)
        b = encoded.codec.block
        return round_up(rows, b) // b, round_up(cols, b) // b, b

    def place(self, encoded, v):
        gr, gc, b = self._grid(encoded)
        rows, cols = encoded.matrix_shape
        return v.reshape(gr, gc, b, b).permute(0, 2, 1, 3).reshape(gr * b, gc * b)[:rows, :cols]

    def gather(self, encoded, grad_w):
        gr, gc, b = self._grid(encoded)
        g = F.pad(grad_w, (0, gc * b - grad_w.shape[1], 0, gr * b - grad_w.shape[0]))
        return g.reshape(gr, b, gc, b).permute(0, 2, 1, 3).reshape(gr * gc, b, b)

    def write(self, encoded, params):
        p = encoded.codec.unpack(encoded.payload["code"])
        q = {f: as_numpy(params[f]).copy() for f in self.fields}
        d_y = np.where(q["r"] < 0, p["d_y"] + 2, p["d_y"])
        q["r"] = np.abs(q["r"])
        for phase, order, d in (("theta", "d_x", p["d_x"]), ("psi", "d_y", d_y)):
            turns = np.floor(q[phase] / HALF_PI)
            q[phase] = np.clip(q[phase] - turns * HALF_PI, 0.0, HALF_PI)
            q[order] = (d + turns.astype(np.int64)) % 4
        q["omega_x"], q["omega_y"] = np.clip(q["omega_x"], 0, np.pi), np.clip(q["omega_y"], 0, np.pi)
        if not self.with_dc:
            q["dc"] = np.zeros_like(q["r"])
        return _rebuild(encoded, {"code": encoded.codec.pack(q)})


FORMS: dict[str, TorchForm] = {
    "int8": Int8Form(),
    "int4": Int4Form(),
    "cyclic8": LutScaleForm(),
    "cyclic16": Cyclic16Form(),
    "packed64": PackedForm(with_dc=False),
    "packed128": PackedForm(with_dc=True),
}
