"""``trellis``: randomized Hadamard rotation + group-wise scales + trellis-coded values.

The ``hadamard`` codec's rotation and 8-bit group steps (see ``hadamard.py``), with the scalar
grid replaced by a trellis code (``_trellis.py``): each row of the rotated weight is one sequence
coded at ``bits`` bits a value by the Viterbi search, value ``t`` being
``codebook(table)[window_t] * step``. On unit-normal data the squared error is 0.57–0.64× that of the
Lloyd–Max grid at the same bits (2.0–2.5 dB, a third of a bit or more; docs/codecs/trellis.md).

With ``calibration`` (activations or a ``Gram``) the paths are chosen by block LDLQ, GPTQ's
sequential rounding for vector codes (Chee et al. 2023; Tseng et al. 2024): columns in blocks
of ``_BLOCK``, each block searched jointly (weighted by the inverse Cholesky factor's diagonal)
together with ``_LOOKAHEAD`` columns after it, from the state where the previous block ended, its
error propagated to the later columns.

Payload: ``codes`` uint8[rows, stream_bytes(cols_p, bits)] (one stream a row), ``scale_code``
uint8[rows, cols_p / group_size], ``row_scale`` float32[rows]. Bits per weight ≈ bits +
8/group_size + (32 + 8 - bits)/cols (+ header). Lowered, every window is an 8-bit code into the
256-entry code table (``trellis_bits`` set), which the C engine stores as the stream again
(``bits`` bits a weight in memory) and decodes block by block.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import attrs
import numpy as np

from rbe_core import Encoded, hookimpl
from rbe_core.compression.gptq import hessian_factor, row_parts, single_threaded_blas
from rbe_core.native.lowering import HadamardTransform, Lowered

from . import _trellis
from .hadamard import RotatedCodec, factor_steps, group_steps, padded_cols

#: Step of a group = this × its RMS (rotated weights) / the table's scale, per bits: the scale of the code table
#: with the least squared error on unit-normal data.
_STEP_PER_RMS = {2: 1.10, 3: 1.15, 4: 1.20, 5: 1.30, 6: 1.35}
#: Columns searched jointly by block LDLQ, and per lazy update of the columns after them.
_BLOCK = 16
_LAZY = 128
_LOOKAHEAD = 8


def _table_ok(_inst, _attr, value):
    if value not in _trellis.TABLE_SCALE:
        raise ValueError(f"table must be one of {sorted(_trellis.TABLE_SCALE)}, got {value!r}")


def _bits_ok(_inst, _attr, value):
    if value not in _STEP_PER_RMS or isinstance(value, bool):
        raise ValueError(f"bits must be one of {sorted(_STEP_PER_RMS)}, got {value!r}")


@attrs.define(frozen=True)
class TrellisCodec(RotatedCodec):
    """Randomized-Hadamard rotation, 8-bit group scales, trellis-coded ``bits``-bit values."""

    codec_id = "trellis"
    #: calibration tokens its rounding keeps gaining from (``calibration.default_tokens``): SmolLM2,
    #: ``--codec trellis --target-bpw X``, GFDL-1.3 / GPL-3 KL with 16384 tokens against 4096: 4.25
    #: 0.0637 / 0.0532 against 0.0660 / 0.0578, 3.25 0.208 / 0.195 against 0.251 / 0.241, 2.25 0.689 /
    #: 0.705 against 0.769 / 0.741 (docs/quality.md); the scalar ``hadamard`` gains nothing from them
    calibration_tokens = 16384

    bits: int = attrs.field(default=3, validator=_bits_ok)
    #: the code table (``_trellis.codebook``): ``int8`` (integers, looked up as bytes by the
    #: engines' fast paths) or ``normal`` (float quantiles, the only table before ``int8``)
    table: str = attrs.field(default="int8", validator=_table_ok)

    def _code_field(self, payload, rows: int, cols_p: int) -> dict[str, tuple]:
        return {"codes": ((rows, _trellis.stream_bytes(cols_p, self.bits)), "uint8")}

    def _encode_rows(self, w: np.ndarray, calibration) -> dict[str, np.ndarray]:
        """The payload of the rows ``w`` (rows, cols): a whole-row search, or block LDLQ with ``calibration``."""
        cols_p, signs, blocks = self.layout(w.shape[1])
        wr = self._rotated(w, cols_p, signs, blocks)
        g = wr.reshape(len(wr), -1, self.group_size)
        rms = np.sqrt(np.mean(np.square(g), axis=2))
        row_scale, scale_code = factor_steps(rms * (_STEP_PER_RMS[self.bits] / _trellis.TABLE_SCALE[self.table]))
        steps = np.repeat(group_steps(row_scale, scale_code), self.group_size, axis=1)
        if calibration is None:
            safe = np.where(steps > 0, steps, 1.0)
            paths = _trellis.search((wr / safe).T, np.square(steps).T, self.bits, table=_trellis.codebook(self.table)).T
        else:
            h = self._hessian(calibration, w.shape[1], cols_p, signs, blocks)
            paths = self._ldlq(wr, steps, hessian_factor(h, float(self.damp), False))
        return {"codes": _trellis.pack_paths(np.ascontiguousarray(paths), self.bits),
                "scale_code": scale_code, "row_scale": row_scale}

    def _ldlq(self, wr: np.ndarray, steps: np.ndarray, factor) -> np.ndarray:
        """Block LDLQ paths (uint8 (rows, cols_p)) of rotated weights ``wr`` (float64, changed)."""
        wr[:, factor.dead] = 0.0
        paths = np.empty(wr.shape, dtype=np.uint8)
        parts = [slice(a, b) for a, b in row_parts(*wr.shape)]
        with single_threaded_blas(), ThreadPoolExecutor(len(parts)) as pool:
            list(pool.map(lambda r: self._ldlq_rows(wr[r], steps[r], factor.u, paths[r]), parts))
        return paths

    def _ldlq_rows(self, w, steps, u, paths) -> None:
        """:meth:`_ldlq` of some rows (rows are independent given ``u``). Each block's targets (in
        steps) and weights are made for its columns only: no matrix-sized temporaries."""
        n, cb, diag = w.shape[1], _trellis.codebook(self.table), np.diag(u)
        state = None
        for o1 in range(0, n, _LAZY):
            o2 = min(o1 + _LAZY, n)
            err = np.empty((w.shape[0], o2 - o1))
            for i1 in range(o1, o2, _BLOCK):
                i2 = min(i1 + _BLOCK, o2)
                j2 = min(i2 + _LOOKAHEAD, n)
                s = steps[:, i1:j2]
                weight = np.square(s / diag[i1:j2]).astype(np.float32)
                block = _trellis.search((w[:, i1:j2] / np.where(s > 0, s, 1.0)).T, weight.T, self.bits, state, cb)[: i2 - i1]
                state = block[-1]
                paths[:, i1:i2] = block.T
                ub = u[i1:i2, i1:i2]
                e = np.linalg.solve(ub.T, (w[:, i1:i2] - cb[block.T] * steps[:, i1:i2]).T).T
                err[:, i1 - o1 : i2 - o1] = e
                w[:, i2:o2] -= e @ u[i1:i2, i2:o2]
            w[:, o2:] -= err @ u[o1:o2, o2:]

    def _values(self, encoded: Encoded, start: int, stop: int) -> np.ndarray:
        cols_p = padded_cols(encoded.matrix_shape[1], self.group_size)
        states = _trellis.windows(encoded.payload["codes"][start:stop], cols_p, self.bits)
        return _trellis.codebook(self.table)[states] * self._steps(encoded, start, stop)

    def lower(self, encoded: Encoded) -> Lowered:
        """The canonical layout: each window an 8-bit code into the code table, the group steps,
        the rotation as the input transform."""
        rows, cols = encoded.matrix_shape
        cols_p, signs, blocks = self.layout(cols)
        p = encoded.payload
        return Lowered(
            rows, cols, _trellis.STATE_BITS, self.group_size,
            codes=_trellis.windows(p["codes"], cols_p, self.bits), levels=_trellis.codebook(self.table),
            step=group_steps(p["row_scale"], p["scale_code"]),
            transform=HadamardTransform(signs.astype(np.float32), tuple(blocks)),
            step_row=p["row_scale"], step_code=p["scale_code"], trellis_bits=self.bits,
        )

    def bit_settings(self) -> list[TrellisCodec]:
        """This codec at 6 down to 2 bits, each with groups of its group size and of 2 and 4 times
        it (rotation kept): a budget picks a tensor's groups too (a width that larger groups
        would pad costs the padding's bits). Larger groups store fewer step bits, which the budget
        spends on codes: SmolLM2 ``--target-bpw 4.25`` KL 0.0660 / 0.0578 / 0.125 / 0.0742 against
        0.0780 / 0.0655 / 0.139 / 0.0892 with its groups alone (held-out GFDL-1.3 / GPL-3 /
        Apache-2.0 / MPL-2.0; docs/quality.md)."""
        groups = (self.group_size, 2 * self.group_size, 4 * self.group_size)
        return [attrs.evolve(self, bits=b, group_size=g) for b in (6, 5, 4, 3, 2) for g in groups]

    #: training moves the group steps (stored again as row scale × 8-bit code); paths are fixed
    trainable_lowered = ("step",)

    def from_lowered(self, encoded: Encoded, lowered: Lowered) -> Encoded:
        """The inverse of :meth:`lower`: windows packed into streams again (they must form trellis
        paths), steps factored into row scale × code."""
        rows, cols = encoded.matrix_shape
        cols_p = self.layout(cols)[0]
        if (lowered.bits, lowered.group_size, lowered.rows, lowered.cols, lowered.cols_p) != (
                _trellis.STATE_BITS, self.group_size, rows, cols, cols_p) or lowered.offset is not None:
            raise ValueError("trellis: the lowered layout does not match this codec and shape")
        if not np.array_equal(lowered.levels, _trellis.codebook(self.table)) or not _trellis.is_path(lowered.codes, self.bits):
            raise ValueError("trellis: the code table is fixed and the codes must form trellis paths")
        if lowered.step_row is not None:
            row_scale, scale_code = lowered.step_row, lowered.step_code
        else:
            row_scale, scale_code = factor_steps(lowered.step)
        payload = {"codes": _trellis.pack_paths(lowered.codes, self.bits),
                   "scale_code": scale_code, "row_scale": row_scale}
        return Encoded(self, encoded.shape, payload, dtype=encoded.dtype, source=encoded.source)


@hookimpl
def rbe_register_codecs(register):
    register(TrellisCodec)
