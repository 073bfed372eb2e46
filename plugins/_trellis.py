"""The bit-shift trellis of the ``trellis`` codec: its code table, the Viterbi search, and the
packing of a path into a bit stream (numpy only).

A sequence of ``T`` values is coded by a stream of ``8 + (T - 1) * bits`` bits. Value ``t`` is
``codebook()[window_t]``, where ``window_t`` is the 8-bit little-endian integer at stream bits
``t * bits .. t * bits + 7``: consecutive windows overlap in ``8 - bits`` bits, so every state
(window) can be followed by only ``2**bits`` states, and every bit pattern is a valid path
(Fischer–Marcellin trellis-coded quantization with the bit-shift trellis of QTIP, Tseng et al.
2024). The Viterbi search finds the path of least weighted squared error; on unit-normal data it
has 0.71–0.74× the squared error of the Lloyd–Max scalar quantizer of the same bits (docs/codecs/trellis.md).
"""

from __future__ import annotations

import functools

import numpy as np

try:  # the C search, built with the package when a compiler was there
    from ._trellis_c import ffi as _ffi
    from ._trellis_c import lib as _lib

    _native: tuple | None = (_ffi, _lib)
except ImportError:
    _native = None

#: Bits of a trellis state (a code window): 256 states, so a window is one byte in the engine.
STATE_BITS = 8
STATES = 1 << STATE_BITS
#: Bytes of back-pointers a search keeps at a time (sequences are searched in groups below it).
SEARCH_BYTES = 1 << 25


#: The code tables (:func:`codebook`) and the factor each is scaled by from the unit normal.
TABLE_SCALE = {"int8": 44.0, "normal": 1.0}


@functools.cache
def codebook(table: str = "int8") -> np.ndarray:
    """float32[256], the value of each state in code table ``table`` (one of ``TABLE_SCALE``).

    ``normal``: the 256 quantiles ``Φ⁻¹((i + ½) / 256)`` of the standard normal distribution,
    state ``s`` taking quantile ``i = 187 s mod 256``. Any odd multiplier spreads the ``2**bits``
    successors of a state evenly over the quantiles (the set partitioning of trellis-coded
    quantization); 187 had the least squared error on unit-normal data of all 128, averaged over
    2, 3 and 4 bits (docs/codecs/trellis.md). Pure Python floats (``statistics.NormalDist``): the
    same table on every platform.

    ``int8``: the ``normal`` table × 44 rounded to integers (-127..127), which an engine looks up
    as signed bytes; on unit-normal data its squared error is that of ``normal`` within 0.01 dB at
    2–4 bits, 0.04 dB at 5 and 0.2 dB at 6 (docs/codecs/trellis.md)."""
    if table not in TABLE_SCALE:
        raise ValueError(f"trellis table must be one of {sorted(TABLE_SCALE)}, got {table!r}")
    if table == "int8":
        return np.round(codebook("normal").astype(np.float64) * TABLE_SCALE[table]).astype(np.float32)
    from statistics import NormalDist

    inv = NormalDist().inv_cdf
    return np.array([inv(((187 * s) % STATES + 0.5) / STATES) for s in range(STATES)], dtype=np.float32)


def search(x: np.ndarray, weight: np.ndarray, bits: int, start: np.ndarray | None = None,
           table: np.ndarray | None = None) -> np.ndarray:
    """The least-error paths (uint8 states, shape (T, N)) for ``N`` sequences of ``T`` targets
    ``x`` (T, N) with per-target ``weight`` (T, N): each path minimises
    ``sum_t weight[t] * (x[t] - table[state_t])**2`` (``table``: float32[256], default
    :func:`codebook`). ``start`` (N,) uint8, when given, is
    the state before each sequence (its first state must follow it); otherwise any first state.
    Ties go to the lowest predecessor, then the lowest final state: the result is a fixed
    function of the float32 inputs."""
    x, weight = np.asarray(x, dtype=np.float32), np.asarray(weight, dtype=np.float32)
    steps, n = x.shape
    table = codebook() if table is None else np.asarray(table, dtype=np.float32)
    if _native is not None:
        return _native_search(x, weight, bits, start, table)
    out = np.empty((steps, n), dtype=np.uint8)
    group = max(1, SEARCH_BYTES // max(1, steps * (STATES >> bits)))
    for a in range(0, n, group):
        b = min(n, a + group)
        out[:, a:b] = _search(x[:, a:b], weight[:, a:b], bits, None if start is None else start[a:b], table)
    return out


def _search(x, weight, bits, start, cb):
    steps, n = x.shape
    fan, preds = 1 << bits, STATES >> bits  # successors of a state; groups of predecessors
    # weight * (x - c)^2 without the per-step constant weight * x^2, as c * (-2 w x) + c^2 * w
    # (two products and a sum, each rounded: the C search does the same)
    cb_col, sq_col = cb[:, None], (cb * cb)[:, None]
    scaled = np.empty(n, dtype=np.float32)
    term = np.empty((STATES, n), dtype=np.float32)

    def distance(t):
        np.multiply(x[t], weight[t], out=scaled)
        np.multiply(scaled, np.float32(-2.0), out=scaled)
        d = cb_col * scaled
        np.multiply(sq_col, weight[t], out=term)
        d += term
        return d  # (STATES, n)

    cost = distance(0)
    if start is not None:  # state s follows p iff s's low bits are p's high bits
        follows = (np.arange(STATES)[:, None] & (preds - 1)) == (np.asarray(start, dtype=np.int64) >> bits)[None, :]
        cost[~follows] = np.inf
    back = np.empty((steps, preds, n), dtype=np.uint8)
    best = np.empty((preds, n), dtype=np.float32)
    less = np.empty((preds, n), dtype=bool)
    move = np.empty((preds, n), dtype=np.uint8)
    for t in range(1, steps):
        # state p = q * fan + j is followed by states b * preds + q: the best j for each q
        c = cost.reshape(preds, fan, n)
        arg = back[t]
        np.copyto(best, c[:, 0])
        arg.fill(0)
        for j in range(1, fan):
            np.less(c[:, j], best, out=less)
            np.minimum(best, c[:, j], out=best)
            np.subtract(np.uint8(j), arg, out=move)  # arg = j where less (uint8 arithmetic)
            np.multiply(move, less.view(np.uint8), out=move)
            np.add(arg, move, out=arg)
        cost = distance(t).reshape(fan, preds, n)
        cost += best
        cost = cost.reshape(STATES, n)
    state = cost.argmin(axis=0)
    out = np.empty((steps, n), dtype=np.uint8)
    out[-1] = state
    cols = np.arange(n)
    for t in range(steps - 1, 0, -1):
        q = state & (preds - 1)
        state = (q << bits) | back[t][q, cols]
        out[t - 1] = state
    return out


def _native_search(x, weight, bits, start, table):
    """:func:`search` in C (``src/trellis_search.c``): the same paths."""
    ffi, lib = _native
    steps, n = x.shape
    x, weight = np.ascontiguousarray(x), np.ascontiguousarray(weight)
    out = np.empty((steps, n), dtype=np.uint8)
    first = ffi.NULL if start is None else ffi.from_buffer("uint8_t[]", np.ascontiguousarray(start, dtype=np.uint8))
    rc = lib.rbe_trellis_search(ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", weight), steps, n,
                                bits, first, ffi.from_buffer("float[]", table), ffi.from_buffer("uint8_t[]", out))
    if rc:
        raise MemoryError("trellis search: out of memory") if rc == 2 else ValueError("trellis search: bad arguments")
    return out


def stream_bytes(length: int, bits: int) -> int:
    """Bytes of the stream of a sequence of ``length`` values."""
    return -(-(STATE_BITS + (length - 1) * bits) // 8)


def pack_paths(states: np.ndarray, bits: int) -> np.ndarray:
    """uint8 (rows, T) paths (each state following the previous) -> uint8 (rows,
    ``stream_bytes(T, bits)``) streams: the first state's 8 bits, then each later state's top
    ``bits`` bits."""
    rows, length = states.shape
    first = np.unpackbits(states[:, :1], axis=1, bitorder="little")
    new = states[:, 1:] >> np.uint8(STATE_BITS - bits)
    planes = ((new[:, :, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)).reshape(rows, -1)
    return np.packbits(np.concatenate([first, planes], axis=1), axis=1, bitorder="little")


def windows(streams: np.ndarray, length: int, bits: int) -> np.ndarray:
    """The states (uint8 (rows, ``length``)) of streams packed by :func:`pack_paths`: window
    ``t`` is stream bits ``t * bits .. t * bits + 7``. Any bytes are a valid stream. In C when
    the module was built (the same result)."""
    if _native is not None and streams.shape[1] >= 1:
        ffi, lib = _native
        streams = np.ascontiguousarray(streams, dtype=np.uint8)
        out = np.empty((streams.shape[0], length), dtype=np.uint8)
        lib.rbe_trellis_windows(ffi.from_buffer("uint8_t[]", streams), streams.shape[0], streams.shape[1], length, bits,
                                ffi.from_buffer("uint8_t[]", out))
        return out
    return _numpy_windows(streams, length, bits)


def _numpy_windows(streams: np.ndarray, length: int, bits: int) -> np.ndarray:
    """:func:`windows` in numpy."""
    wide = np.zeros((streams.shape[0], streams.shape[1] + 1), dtype=np.uint16)
    wide[:, :-1] = streams
    pairs = wide[:, :-1] | (wide[:, 1:] << np.uint16(8))
    offset = np.arange(length) * bits
    return ((pairs[:, offset >> 3] >> (offset & 7).astype(np.uint16)) & np.uint16(0xFF)).astype(np.uint8)


def is_path(states: np.ndarray, bits: int) -> bool:
    """Whether each state of the rows of ``states`` (uint8 (rows, T)) can follow the previous one."""
    low = states[:, 1:] & np.uint8((STATES >> bits) - 1)
    return bool(np.array_equal(low, states[:, :-1] >> np.uint8(bits)))
