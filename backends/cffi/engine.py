"""The native decoder ``NativeDecoder``: a whole causal-LM step (the described decoder families,
GPT-2) in C (``src/engine.c``).

Built once from a model's :class:`rbe_core.models.NativePlan` and its encoded tensors: every
matrix is *lowered* (``rbe_core.native.lowering``) to the canonical layout and copied into the engine,
which repacks the codes (nibbles up to 4 bits, bytes above) and keeps its own KV cache; codes a
codec stores already packed as the engine's nibble blocks (``Lowered.nibbles``) are read in place
from the mapped file instead, so loading them costs no copy and processes share their pages. Each
``forward`` is one C call for a whole prefill or decode step, with the GIL released.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from rbe_core.container import release, trim_heap
from rbe_core.errors import NativeUnavailableError
from rbe_core.models.spec import ModelError
from rbe_core.native.lowering import Lowered, lower

from . import library
from .ops import as_f32, matrix_desc, rejection

ARCHS = {"decoder": 1, "gpt2": 2}
ROPE = {"none": 0, "half": 1, "interleaved": 2}
ACTIVATIONS = {"silu_gated": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3, "gelu_tanh_gated": 4}
MATRIX_SLOTS = {"q": 0, "k": 1, "v": 2, "o": 3, "gate": 4, "up": 5, "down": 6, "qkv": 7, "gate_up": 8, "router": 9,
                "embed": 0, "pos": 1, "head": 2}
_EXPERT_SLOT, _EXPERT_ROLES = 10, ("expert_gate", "expert_up", "expert_down")
VECTOR_SLOTS = {"norm1": 0, "norm1_b": 1, "norm2": 2, "norm2_b": 3, "final": 0, "final_b": 1,
                "attn_norm": 0, "ffn_norm": 2, "attn_post_norm": 4, "ffn_post_norm": 5, "q_norm": 6, "k_norm": 7}
_DECODER_FLOATS = ("norm_offset", "embed_scale", "attn_softcap", "final_softcap")
_DECODER_INTS = ("rotary_dim", "n_experts", "experts_used", "expert_intermediate", "norm_topk")
#: ``RBE_ENGINE_KV``: the KV cache's element type (float16 by default, as llama.cpp's: half the
#: memory and the attention's memory traffic; 'int8' with a float32 scale per position and kv head,
#: as llama.cpp's ``q8_0``: about a quarter; float32 for bit-level agreement with the torch path).
KV_ENV = "RBE_ENGINE_KV"
KV_TYPES = {"f16": 1, "f32": 0, "int8": 2}
#: ``RBE_ENGINE_ACT``: the inputs of products with coded matrices: 'int8' (the default, as
#: llama.cpp's: quantized per token and 32-column block, after an exact in-block Hadamard
#: rotation where the matrix has no input transform of its own, and multiplied on integer units;
#: one token's products too where the kernels are faster so: nibble codes, and trellis codes on
#: the VBMI path) or 'f32' (bit-level agreement with the torch path).
ACT_ENV = "RBE_ENGINE_ACT"
ACT_TYPES = {"int8": 1, "f32": 0}
_CONFIG_INTS = ("n_layers", "hidden", "intermediate", "n_heads", "n_kv_heads", "head_dim", "vocab", "max_ctx")


class NativeDecoder:
    """A loaded model in the C engine. ``forward(ids, pos)`` runs tokens at positions
    ``pos, pos + 1, ...`` (``pos`` at most the cached length; later cache entries are dropped) and
    returns float32 logits of the last token, or of every token with ``all_logits``. ``slot``
    picks one of ``slots`` independent KV caches (sequences); calls are serialised by a lock."""

    def __init__(self, plan, tensors, *, lowered=None, kv: str | None = None, act: str | None = None):
        """``lowered`` (name -> Lowered), when given, is used instead of lowering ``tensors``;
        ``kv``: 'f16', 'int8' or 'f32' cache (default ``$RBE_ENGINE_KV``, else 'f16'); ``act``: 'int8' or
        'f32' product inputs (default ``$RBE_ENGINE_ACT``, else 'int8')."""
        lib, ffi = library.require_lib(), library.ffi
        self._lib, self._ffi = lib, ffi
        self._lock = threading.Lock()
        cfg = plan.config
        self.vocab, self.max_ctx = int(cfg["vocab"]), int(cfg["max_ctx"])
        c = ffi.new("rbe_engine_config *")
        for key in _CONFIG_INTS:
            setattr(c, key, int(cfg[key]))
        c.arch, c.eps, c.rope_theta = ARCHS[plan.arch], float(cfg["eps"]), float(cfg.get("rope_theta", 10000.0))
        c.rope_style, c.activation = ROPE[cfg["rope_style"]], ACTIVATIONS[cfg["activation"]]
        c.n_transforms = len(plan.matrices)  # an upper bound: ids are given as transforms appear
        if plan.arch == "decoder":
            _decoder_settings(c, cfg)
        self.kv = _setting(kv, KV_ENV, KV_TYPES, "f16")
        c.kv_type = KV_TYPES[self.kv]
        self.act = _setting(act, ACT_ENV, ACT_TYPES, "int8")
        c.act_int8 = ACT_TYPES[self.act]
        handle = lib.rbe_engine_new(c)
        if handle == ffi.NULL:
            raise NativeUnavailableError("the native engine rejected the model config (or memory is short)")
        self._e = ffi.gc(handle, lib.rbe_engine_free)
        if plan.arch == "decoder":
            self._set_layers(cfg, tensors)
        transforms: dict[tuple, int] = {}
        self._borrowed: list[np.ndarray] = []  # arrays the engine reads in place: alive as long as it
        for layer, slot, weight, bias, transposed in plan.matrices:  # one lowered matrix alive at a time
            low = lowered[weight] if lowered is not None else _lower(tensors[weight])
            tf = -1
            if low.transform is not None:
                tf = transforms.get(low.transform.key, -1)
                if tf < 0:
                    tf = transforms[low.transform.key] = len(transforms)
                    self._set_transform(tf, low.transform)
            borrowed = self._set_matrix(layer, _matrix_slot(slot), weight, low,
                                        None if bias is None else tensors[bias].decode(), transposed, tf)
            del low
            # the engine holds its own copy, so the file's pages can go; a borrowed tensor keeps all
            # of its pages (dropping its steps' would split the huge pages its codes share)
            if borrowed is None:
                release(*tensors[weight].payload.values())
            trim_heap()  # the lowering's freed temporaries: 1B shape, 695 -> 668 MB resident once loaded
        for layer, slot, name in plan.vectors:
            v = as_f32(tensors[name].decode().reshape(-1))
            self._check(lib.rbe_engine_set_vector(self._e, layer, VECTOR_SLOTS[slot],
                                                  ffi.from_buffer("float[]", v), v.size), f"vector {name}")
        self._epoch = 0

    def _set_layers(self, cfg, tensors) -> None:
        """RoPE tables (divided by the model's frequency divisors, when it has them) and each
        layer's RoPE kind and sliding window."""
        divisors = None
        if cfg.get("rope_divisors"):
            divisors = as_f32(tensors[cfg["rope_divisors"]].decode().reshape(-1))
        for kind, (inv, factor) in enumerate(cfg["ropes"]):
            inv = as_f32(np.asarray(inv, dtype=np.float32) / (1 if divisors is None else divisors))
            self._check(self._lib.rbe_engine_set_rope(self._e, kind, self._ffi.from_buffer("float[]", inv), inv.size,
                                                      float(factor)), f"RoPE table {kind}")
        for layer, (kind, window) in enumerate(zip(cfg["layer_rope"], cfg["layer_window"], strict=True)):
            self._check(self._lib.rbe_engine_set_layer(self._e, layer, int(kind), int(window)), f"layer {layer}")

    def _set_transform(self, tf: int, t) -> None:
        blocks = np.asarray(t.blocks, dtype=np.int64)
        self._check(self._lib.rbe_engine_set_transform(
            self._e, tf, t.cols_p, self._ffi.from_buffer("float[]", as_f32(t.signs)),
            self._ffi.from_buffer("long long[]", blocks), len(blocks)), "a transform")

    def _set_matrix(self, layer, slot, name, low: Lowered, bias, transposed, tf) -> np.ndarray | None:
        """Sets one matrix; returns the array the engine reads in place (``low.nibbles``), or None."""
        d, _keep = matrix_desc(self._ffi, low, bias, transposed, tf, borrow=True)
        rc = self._lib.rbe_engine_set_matrix(self._e, layer, slot, d)
        if rc:
            raise NativeUnavailableError(f"tensor {name}: {rejection(low, rc)}")
        if not d.borrow:
            return None
        self._borrowed.append(low.nibbles)
        return low.nibbles

    def _check(self, rc: int, what: str) -> None:
        if rc:
            raise NativeUnavailableError(f"the native engine rejected {what} (error {rc})")

    #: Independent sequences (KV cache slots) the engine can hold at once, sharing the weights;
    #: a slot's cache takes memory only as its positions are written.
    slots = 64

    def _use(self, slot: int) -> None:
        rc = self._lib.rbe_engine_use_slot(self._e, slot)
        if rc:
            raise RuntimeError(f"native engine: KV cache slot {slot}: {library.engine_error(rc)}")

    @property
    def length(self) -> int:
        """Positions held in the KV cache of the slot the last call used."""
        return int(self._lib.rbe_engine_length(self._e))

    def slot_length(self, slot: int) -> int:
        """Positions held in the KV cache of ``slot``."""
        with self._lock:
            self._use(slot)
            return self.length

    @property
    def nbytes(self) -> int:
        """Bytes the engine holds for weights, tables and scratch (the KV cache excluded)."""
        return int(self._lib.rbe_engine_bytes(self._e))

    def forward(self, ids, pos: int = 0, *, all_logits: bool = False, slot: int = 0) -> np.ndarray:
        tokens = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        n = tokens.size
        if n == 0:
            raise ModelError("no tokens to run")
        if pos < 0 or pos + n > self.max_ctx:
            raise ModelError(f"positions {pos}..{pos + n - 1} exceed the model's context of {self.max_ctx}")
        if tokens.min() < 0 or tokens.max() >= self.vocab:
            raise ModelError(f"token id out of range [0, {self.vocab})")
        out = np.empty((n if all_logits else 1, self.vocab), dtype=np.float32)
        ffi = self._ffi
        if not 0 <= slot < self.slots:
            raise ModelError(f"KV cache slot {slot} is outside 0..{self.slots - 1}")
        with self._lock:
            self._use(slot)
            if pos > self.length:
                raise ModelError(f"position {pos} is past the {self.length} cached positions")
            rc = self._lib.rbe_engine_forward(
                self._e, ffi.from_buffer("long long[]", tokens), n, pos,
                ffi.from_buffer("float[]", out, require_writable=True), int(all_logits),
                library.ISAS[library.active_isa()], library.thread_count())
        if rc:
            raise RuntimeError(f"native engine forward failed: {library.engine_error(rc)}")
        return out if all_logits else out[0]

    def forward_batch(self, rows: list[tuple[int, list[int], int]], want: list[bool] | None = None) -> np.ndarray:
        """Several sequences in one pass over the weights: each row of ``rows`` is (slot, tokens,
        pos), the tokens run at positions ``pos, pos + 1, ...`` of that slot's KV cache (``pos`` at
        most its cached length; later entries are dropped). Returns float32 logits of each row's
        last token whose ``want`` entry is true (default: every row), in order."""
        want = [True] * len(rows) if want is None else list(want)
        tokens, slots, positions, flags = [], [], [], []
        for (slot, ids, pos), wanted in zip(rows, want, strict=True):
            ids = [int(t) for t in ids]
            if not ids:
                raise ModelError("no tokens to run")
            if not 0 <= slot < self.slots:
                raise ModelError(f"KV cache slot {slot} is outside 0..{self.slots - 1}")
            if pos < 0 or pos + len(ids) > self.max_ctx:
                raise ModelError(f"positions {pos}..{pos + len(ids) - 1} exceed the model's context of {self.max_ctx}")
            tokens += ids
            slots += [slot] * len(ids)
            positions += range(pos, pos + len(ids))
            flags += [0] * (len(ids) - 1) + [int(wanted)]
        tok = np.asarray(tokens, dtype=np.int64)
        if tok.min() < 0 or tok.max() >= self.vocab:
            raise ModelError(f"token id out of range [0, {self.vocab})")
        out = np.empty((sum(flags), self.vocab), dtype=np.float32)
        ffi = self._ffi
        arrays = (tok, np.asarray(slots, dtype=np.intc), np.asarray(positions, dtype=np.int64),
                  np.asarray(flags, dtype=np.uint8))
        with self._lock:
            rc = self._lib.rbe_engine_forward_batch(
                self._e, ffi.from_buffer("long long[]", arrays[0]), ffi.from_buffer("int[]", arrays[1]),
                ffi.from_buffer("long long[]", arrays[2]), ffi.from_buffer("unsigned char[]", arrays[3]), tok.size,
                ffi.from_buffer("float[]", out, require_writable=True) if out.size else ffi.new("float[1]"),
                library.ISAS[library.active_isa()], library.thread_count())
        if rc:
            raise RuntimeError(f"native engine batch failed: {library.engine_error(rc)}")
        return out

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Slot ``dst``'s KV cache becomes the first ``n`` positions of slot ``src``'s (a prompt
        prefix computed once for several sequences); ``ModelError`` unless ``src`` holds ``n``."""
        for slot in (src, dst):
            if not 0 <= slot < self.slots:
                raise ModelError(f"KV cache slot {slot} is outside 0..{self.slots - 1}")
        with self._lock:
            rc = self._lib.rbe_engine_copy_prefix(self._e, src, dst, n)
        if rc:
            raise ModelError(f"cannot copy {n} positions of KV cache slot {src} to slot {dst}: "
                             f"{library.engine_error(rc)}")

    def profile(self) -> dict[str, float]:
        """Seconds spent since the last call in weight kernels, attention and everything else."""
        s = self._ffi.new("double[3]")
        self._lib.rbe_engine_profile(self._e, s)
        return {"kernels": s[0], "attention": s[1], "rest": s[2]}


def _decoder_settings(c, cfg) -> None:
    """The decoder's fields of the engine config ``c`` from ``NativePlan.config``."""
    for key in _DECODER_FLOATS:
        setattr(c, key, float(cfg[key]))
    for key in _DECODER_INTS:
        setattr(c, key, int(cfg[key]))
    c.attn_scale = 0.0 if cfg["attn_scale"] is None else float(cfg["attn_scale"])
    c.n_ropes = len(cfg["ropes"])


def _matrix_slot(slot: str) -> int:
    """The engine's slot number of plan slot ``slot`` (``expert_up.3``: expert 3's up)."""
    role, _, expert = slot.partition(".")
    if expert:
        return _EXPERT_SLOT + 3 * int(expert) + _EXPERT_ROLES.index(role)
    return MATRIX_SLOTS[slot]


def _setting(value: str | None, env: str, choices: dict, default: str) -> str:
    """``value``, else ``$env``, else ``default``; ValueError unless one of ``choices``."""
    value = value or os.environ.get(env, "").strip().lower() or default
    if value not in choices:
        raise ValueError(f"{env}={value!r}: expected one of {', '.join(choices)}")
    return value


def _lower(encoded) -> Lowered:
    low = lower(encoded, cache=False)
    if low is None:
        raise NativeUnavailableError(f"codec {encoded.codec.codec_id!r} has no canonical layout (Codec.lower)")
    return low
