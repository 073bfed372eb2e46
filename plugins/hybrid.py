"""``hybrid``: the seeds' ``HybridEncodedBlock`` — per block, geometry basis coefficients plus the
top-K coefficients of the residual in a DCT or Haar domain (seeds 001, 003, 004).

The tensor, viewed as (rows, cols), is padded by edge replication to whole B x B blocks
(B = 64, 128 or 256, or chosen per tensor with ``block_size="adaptive"``). Per block:

1. least-squares fit of 9 basis functions (``_transforms.geometry_basis``: 1, x, y, xy, x², y²,
   f(ρ), f(ρ)cos φ, f(ρ)sin φ with f the geometry's radial function), stored as float16;
2. the residual after the (float16) fit goes through an orthonormal 2-D DCT-II or Haar transform;
3. the kept coefficients are stored sparsely as (uint16 flat index, float16 value).

Which coefficients are kept: with a quality ``grade`` the encoder keeps, over the whole tensor, the
fewest largest coefficients whose dropped energy meets the grade's relative-RMSE threshold
(S ≤ 0.1 %, A ≤ 1 %, B ≤ 5 %, C ≤ 10 %); that yields a per-block K (the block's "K level"),
capped at ``k`` when ``k`` is set. Without a grade every block keeps exactly ``k`` coefficients.

Payload: ``block`` int32[1] (B); ``basis`` float16[nblocks, 9]; ``counts`` int32[nblocks] (K per
block, blocks in row-major order); ``index`` uint16[ΣK]; ``value`` float16[ΣK].
Decode (float64, cast to float32 at the end): ``A @ basis + T.T @ C @ T`` per block, cropped.
Per-block transforms run on a thread pool (``workers``; 0 = one per CPU); results do not depend on
the number of workers.
"""

from __future__ import annotations

import attrs
import numpy as np

from rbe_core import Codec, Encoded, hookimpl
from rbe_core.abc import check_payload
from rbe_core.arrays import as_weight, matrix_shape
from rbe_core.errors import RBEFormatError
from rbe_core.registry import registry

from ._blocks import (
    check_float16_range,
    from_blocks,
    pad_blocks,
    parallel_map,
    require,
    round_up,
    rows_from_block_rows,
    to_blocks,
)
from ._transforms import N_BASIS, TRANSFORMS, geometry_basis, transform_matrix

BLOCK_SIZES = (64, 128, 256)
#: quality grade -> largest relative RMSE (RMSE / RMS of the tensor) the encoder may leave.
GRADES = {"S": 0.001, "A": 0.01, "B": 0.05, "C": 0.10}
_SAFETY = 0.97  # headroom for float16 rounding of the kept values
_CHUNK = 64  # blocks per thread-pool task


def _get_geometry(name: str):
    entry = registry().lookup("geometries", name)
    if entry is None:
        known = ", ".join(sorted(registry().entries["geometries"]))
        raise RBEFormatError(f"hybrid: unknown geometry {name!r}; registered geometries: {known}")
    return entry.obj


def _check_block_size(_inst, attribute, value) -> None:
    if value != "adaptive" and value not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES} or 'adaptive', got {value!r}")


def _check_k(inst, attribute, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"k must be a non-negative integer or None, got {value!r}")
    if value is None and inst.grade is None:
        raise ValueError("hybrid needs a quality grade, a fixed k, or both")


@attrs.define(frozen=True)
class HybridCodec(Codec):
    codec_id = "hybrid"
    block_size: int | str = attrs.field(default="adaptive", validator=_check_block_size)
    transform: str = attrs.field(default="dct", validator=attrs.validators.in_(tuple(TRANSFORMS)))
    geometry: str = attrs.field(default="poincare", validator=attrs.validators.instance_of(str))
    grade: str | None = attrs.field(default="A", validator=attrs.validators.optional(attrs.validators.in_(tuple(GRADES))))
    k: int | None = attrs.field(default=None, validator=_check_k)
    workers: int = attrs.field(default=0, validator=attrs.validators.instance_of(int))

    # -- encoding -------------------------------------------------------------------------------
    def _analyse(self, blocks: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
        """float16 basis coefficients (n, 9) and transform coefficients (n, b*b) of the residual."""
        a, pinv = geometry_basis(_get_geometry(self.geometry), b)
        t = transform_matrix(self.transform, b)

        def work(start: int) -> tuple[np.ndarray, np.ndarray]:
            x = blocks[start : start + _CHUNK].astype(np.float64).reshape(-1, b * b)
            coef = (x @ pinv.T).astype(np.float16)
            resid = (x - coef.astype(np.float64) @ a.T).reshape(-1, b, b)
            return coef, (t @ resid @ t.T).reshape(-1, b * b)

        parts = parallel_map(work, range(0, len(blocks), _CHUNK), self.workers)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _keep_mask(self, spec: np.ndarray, energy: float) -> np.ndarray:
        """Boolean (n, b*b): which transform coefficients to store."""
        mag = np.abs(spec)
        n, m = spec.shape
        if self.grade is None:
            k = min(self.k, m)
            keep = np.zeros_like(mag, dtype=bool)
            if k:
                top = np.argpartition(-mag, k - 1, axis=1)[:, :k]
                np.put_along_axis(keep, top, True, axis=1)
            return keep
        budget = (GRADES[self.grade] * _SAFETY) ** 2 * energy
        flat = np.sort((mag * mag).ravel())  # ascending: drop the smallest first
        dropped = np.cumsum(flat)
        n_drop = int(np.searchsorted(dropped, budget, side="right"))
        keep = mag > (np.sqrt(flat[n_drop - 1]) if n_drop > 0 else -1.0)
        if self.k is not None and self.k < m:
            rank = np.argsort(np.argsort(-mag, axis=1, kind="stable"), axis=1, kind="stable")
            keep &= rank < self.k
        return keep

    def _encode_at(self, w2: np.ndarray, b: int) -> dict[str, np.ndarray]:
        blocks = to_blocks(pad_blocks(w2, b, b), b, b)
        basis, spec = self._analyse(blocks, b)
        keep = self._keep_mask(spec, float(np.sum(w2.astype(np.float64) ** 2)))
        blk, idx = np.nonzero(keep)
        return {
            "block": np.array([b], dtype=np.int32),
            "basis": basis,
            "counts": keep.sum(axis=1).astype(np.int32),
            "index": idx.astype(np.uint16),
            "value": spec[blk, idx].astype(np.float16),
        }

    def encode(self, weight, *, calibration=None, source: str = "") -> Encoded:
        w, dtype = as_weight(weight, min_ndim=2)
        check_float16_range(w, self.codec_id)
        w2 = w.reshape(matrix_shape(w.shape))
        if self.block_size != "adaptive":
            sizes = [self.block_size]
        else:
            sizes = [b for b in BLOCK_SIZES if b == BLOCK_SIZES[0] or b <= max(w2.shape)]
        best = None
        for b in sizes:
            payload = self._encode_at(w2, b)
            nbytes = sum(int(v.nbytes) for v in payload.values())
            if best is None or nbytes < best[0]:
                best = (nbytes, payload)
        return Encoded(self, w.shape, best[1], dtype=dtype, source=source)

    # -- decoding -------------------------------------------------------------------------------
    def validate(self, encoded: Encoded) -> None:
        cid = self.codec_id
        block = encoded.payload.get("block")
        require(
            isinstance(block, np.ndarray) and block.shape == (1,) and block.dtype == np.int32,
            cid, "field 'block' must be int32[1]",
        )
        b = int(block[0])
        require(b in BLOCK_SIZES, cid, f"block size {b} is not one of {BLOCK_SIZES}")
        require(self.block_size in ("adaptive", b), cid, f"block size {b} contradicts config {self.block_size}")
        if len(encoded.shape) < 2:
            raise RBEFormatError(f"{cid}: shape {list(encoded.shape)} is not 2-D or more")
        rows, cols = matrix_shape(encoded.shape)
        nblocks = (round_up(rows, b) // b) * (round_up(cols, b) // b)
        counts = encoded.payload.get("counts")
        total = int(counts.astype(np.int64).sum()) if isinstance(counts, np.ndarray) and counts.dtype == np.int32 else -1
        check_payload(
            encoded,
            {
                "block": ((1,), "int32"),
                "basis": ((nblocks, N_BASIS), "float16"),
                "counts": ((nblocks,), "int32"),
                "index": ((max(total, 0),), "uint16"),
                "value": ((max(total, 0),), "float16"),
            },
        )
        p = encoded.payload
        require(bool(np.all((p["counts"] >= 0) & (p["counts"] <= b * b))), cid, "block counts out of range")
        require(bool(np.all(p["index"] < b * b)), cid, "coefficient index outside the block")
        require(bool(np.isfinite(p["basis"]).all() and np.isfinite(p["value"]).all()), cid, "non-finite values")
        _get_geometry(self.geometry)

    def _decode_block_rows(self, encoded: Encoded, br0: int, br1: int) -> np.ndarray:
        """Block rows ``br0:br1`` decoded, padded width, float64."""
        p = encoded.payload
        b = int(p["block"][0])
        rows, cols = encoded.matrix_shape
        gc = round_up(cols, b) // b
        a, _ = geometry_basis(_get_geometry(self.geometry), b)
        t = transform_matrix(self.transform, b)
        offsets = np.concatenate([[0], np.cumsum(p["counts"], dtype=np.int64)])
        first, last = br0 * gc, br1 * gc
        n = last - first
        spec = np.zeros((n, b * b))
        lo, hi = offsets[first], offsets[last]
        owner = np.repeat(np.arange(n), p["counts"][first:last])
        spec[owner, p["index"][lo:hi].astype(np.int64)] = p["value"][lo:hi].astype(np.float64)
        x = (t.T @ spec.reshape(n, b, b) @ t).reshape(n, b * b)
        x += p["basis"][first:last].astype(np.float64) @ a.T
        return from_blocks(x.reshape(n, b, b), br1 - br0, gc)

    def decode_rows(self, encoded: Encoded, start: int, stop: int) -> np.ndarray:
        b = int(encoded.payload["block"][0])
        return rows_from_block_rows(
            lambda br0, br1: self._decode_block_rows(encoded, br0, br1), start, stop, b, encoded.matrix_shape[1]
        )

    def decode(self, encoded: Encoded) -> np.ndarray:
        return self.decode_rows(encoded, 0, encoded.matrix_shape[0]).reshape(encoded.shape)


def grade_of(relative_rmse: float) -> str | None:
    """The best quality grade whose threshold ``relative_rmse`` meets, or None."""
    for name, limit in GRADES.items():
        if relative_rmse <= limit:
            return name
    return None


@hookimpl
def rbe_register_codecs(register):
    register(HybridCodec)
