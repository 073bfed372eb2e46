"""torch layers that run from encoded weights: RBELinear, RBEEmbedding, RBEAttention, RBEFFN.

Weight matrices stay encoded; each forward goes through the backend's fused ``linear`` (decode
inside the matmul, never the whole float32 matrix), and the backward computes the input gradient
with ``linear_grad_input`` the same way. Norms and biases are plain torch tensors (uncompressed).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .abc import Backend, Encoded
from .registry import get_backend


def _fused_forward(x, bias, encoded, backend, transposed):
    """``x @ W.T + b`` (``x @ W + b`` when ``transposed``) through the backend's fused kernels."""
    if transposed:
        out = backend.linear_grad_input(x, encoded)
        return out if bias is None else out + bias.to(out.dtype)
    return backend.linear(x, encoded, bias)


class _FusedLinear(torch.autograd.Function):
    """y = x @ W.T + b (or x @ W + b when ``transposed``) with W kept encoded in both passes."""

    @staticmethod
    def forward(ctx, x, bias, encoded, backend, transposed):
        ctx.encoded, ctx.backend, ctx.transposed = encoded, backend, transposed
        return _fused_forward(x, bias, encoded, backend, transposed)

    @staticmethod
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous()
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            op = ctx.backend.linear if ctx.transposed else ctx.backend.linear_grad_input
            grad_x = op(grad_out, ctx.encoded)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None


class RBELinear(nn.Module):
    """A linear layer whose weight is an ``Encoded`` tensor.

    The stored matrix is (out_features, in_features) like ``nn.Linear``; with ``transposed=True`` it
    is (in_features, out_features) like GPT-2's Conv1D, and the layer computes ``x @ W + b`` with
    the same fused kernels (forward and backward swap roles). The bias is an uncompressed parameter.
    """

    def __init__(self, encoded: Encoded, bias: torch.Tensor | None = None, backend: Backend | None = None,
                 *, transposed: bool = False):
        super().__init__()
        if len(encoded.shape) != 2:
            raise ValueError(f"RBELinear needs a 2-D weight, got shape {list(encoded.shape)}")
        self.encoded = encoded
        self.backend = backend if backend is not None else get_backend()
        self.transposed = transposed
        rows, cols = encoded.shape
        self.out_features, self.in_features = (cols, rows) if transposed else (rows, cols)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias shape {list(bias.shape)} does not match {self.out_features} outputs")
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias, dtype=torch.float32))

    @classmethod
    def from_encoded(cls, encoded: Encoded, bias=None, backend: Backend | None = None, *,
                     transposed: bool = False) -> RBELinear:
        if bias is not None and not isinstance(bias, torch.Tensor):
            bias = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
        return cls(encoded, bias, backend, transposed=transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return _FusedLinear.apply(x, self.bias, self.encoded, self.backend, self.transposed)
        # nothing to differentiate (inference): skip the autograd.Function machinery
        return _fused_forward(x, self.bias, self.encoded, self.backend, self.transposed)

    def dense_weight(self) -> torch.Tensor:
        """The decoded weight in ``nn.Linear`` layout (out, in); materialises it (for export/reference)."""
        w = torch.from_numpy(np.ascontiguousarray(self.encoded.decode()))
        return w.T.contiguous() if self.transposed else w

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"codec={self.encoded.codec.codec_id}, bias={self.bias is not None}, transposed={self.transposed}")


def _contiguous_runs(ids: np.ndarray):
    """Split sorted unique ``ids`` into (start, stop) ranges of consecutive values."""
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    for run in np.split(ids, breaks):
        yield int(run[0]), int(run[-1]) + 1


class RBEEmbedding(nn.Module):
    """An embedding table kept encoded; a lookup decodes only the rows it is asked for."""

    def __init__(self, encoded: Encoded):
        super().__init__()
        if len(encoded.shape) != 2:
            raise ValueError(f"RBEEmbedding needs a 2-D table, got shape {list(encoded.shape)}")
        self.encoded = encoded
        self.num_embeddings, self.embedding_dim = encoded.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).cpu().numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        uniq, inverse = np.unique(flat, return_inverse=True)
        rows = [self.encoded.decode_rows(a, b) for a, b in _contiguous_runs(uniq)] if uniq.size else []
        table = np.concatenate(rows) if rows else np.empty((0, self.embedding_dim), np.float32)
        out = torch.from_numpy(table)[torch.from_numpy(inverse.reshape(-1))]
        return out.reshape(*ids.shape, self.embedding_dim).to(ids.device)


class RotaryEmbedding(nn.Module):
    """RoPE. ``style="half"`` pairs dims (i, i + r/2) (HF Llama); ``"interleaved"`` pairs (2i, 2i+1)
    (llama.cpp, whose GGUF q/k weights are permuted to match).

    ``dim``: the head dim. ``rotary_dim``: the leading dims of each head that rotate (partial
    rotary, Phi-3 style: the rest pass through; default all). ``inv_freq``: the ``rotary_dim / 2``
    inverse frequencies (default: ``theta ** (-2i / rotary_dim)``); ``attention_factor`` multiplies
    cos and sin (YaRN)."""

    def __init__(self, dim: int, theta: float = 10000.0, style: str = "half", *, inv_freq=None,
                 attention_factor: float = 1.0, rotary_dim: int | None = None):
        super().__init__()
        if style not in ("half", "interleaved"):
            raise ValueError(f"unknown rope style {style!r}")
        rotary_dim = dim if rotary_dim is None else int(rotary_dim)
        if rotary_dim % 2 or not 0 < rotary_dim <= dim:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and within the head dim {dim}")
        self.dim, self.rotary_dim, self.style = dim, rotary_dim, style
        self.attention_factor = float(attention_factor)
        if inv_freq is None:
            inv = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        else:
            inv = torch.tensor(np.asarray(inv_freq, dtype=np.float32)).reshape(-1)
            if inv.numel() != rotary_dim // 2:
                raise ValueError(f"{inv.numel()} inverse frequencies for {rotary_dim} rotated dims")
        self.register_buffer("inv_freq", inv, persistent=False)
        self._last: tuple | None = None

    def _angles(self, offset: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions offset .. offset + n - 1; the last pair is kept, since every
        layer of a model (and q and k) asks for the same positions in one forward pass."""
        key = (offset, n, str(device), self.inv_freq.data_ptr(), torch.is_inference_mode_enabled())
        if self._last is None or self._last[0] != key:
            pos = torch.arange(offset, offset + n, dtype=torch.float32, device=device)
            freqs = torch.outer(pos, self.inv_freq.to(device))
            cos, sin = freqs.cos(), freqs.sin()
            if self.attention_factor != 1.0:
                cos, sin = cos * self.attention_factor, sin * self.attention_factor
            if self.style == "half":
                cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
            self._last = (key, cos, sin)
        return self._last[1], self._last[2]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.style == "half":
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
            return x * cos + torch.cat((-x2, x1), -1) * sin
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)

    def forward(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """Rotate ``x`` (batch, heads, time, dim) for positions offset .. offset + time - 1."""
        cos, sin = self._angles(offset, x.shape[-2], x.device)
        if self.rotary_dim == x.shape[-1]:
            return self._rotate(x, cos, sin)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        return torch.cat((self._rotate(rot, cos, sin), rest), -1)


class RBEAttention(nn.Module):
    """Multi-head / grouped-query self-attention with optional causal mask, RoPE and KV cache.

    Projections are any modules (``RBELinear`` normally): either ``q, k, v`` or one fused ``qkv``
    whose output is [q | k | v]. ``forward`` returns ``(output, (k, v))``; pass the returned cache
    back as ``past`` to continue. ``key_padding_mask`` (batch, total keys) is True for real tokens.

    Options: ``scale`` multiplies the scores (None: divided by sqrt(head_dim)); ``softcap`` c > 0
    caps them as ``c * tanh(s / c)`` before the mask; ``window`` w > 0: a query at position p sees
    only keys at positions > p - w (sliding window, also across a longer cache); ``q_norm`` /
    ``k_norm``: norms of the queries and keys before RoPE, over each head (``qk_norm="head"``) or
    over the whole projection (``"full"``).
    """

    def __init__(self, *, o: nn.Module, n_heads: int, n_kv_heads: int | None = None, head_dim: int,
                 q: nn.Module | None = None, k: nn.Module | None = None, v: nn.Module | None = None,
                 qkv: nn.Module | None = None, causal: bool = True, rope: RotaryEmbedding | None = None,
                 scale: float | None = None, softcap: float = 0.0, window: int = 0,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None, qk_norm: str = "head"):
        super().__init__()
        if (qkv is None) == (q is None or k is None or v is None):
            raise ValueError("give either q, k and v, or a fused qkv projection")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{n_heads} heads are not a multiple of {self.n_kv_heads} kv heads")
        if (q_norm is None) != (k_norm is None):
            raise ValueError("give both q_norm and k_norm, or neither")
        if qk_norm not in ("head", "full"):
            raise ValueError(f"qk_norm must be 'head' or 'full', got {qk_norm!r}")
        self.head_dim, self.causal, self.rope = head_dim, causal, rope
        self.q, self.k, self.v, self.qkv, self.o = q, k, v, qkv, o
        self.scale, self.softcap, self.window = scale, float(softcap or 0.0), int(window or 0)
        self.q_norm, self.k_norm, self.qk_norm = q_norm, k_norm, qk_norm

    def _split(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_padding_mask: torch.Tensor | None = None):
        b, s, _ = x.shape
        if self.qkv is not None:
            q, k, v = self.qkv(x).split(
                [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], -1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        if self.q_norm is not None and self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self._split(q, self.n_heads), self._split(k, self.n_kv_heads), self._split(v, self.n_kv_heads)
        if self.q_norm is not None and self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        offset = 0 if past is None else past[0].shape[2]
        if self.rope is not None:
            q, k = self.rope(q, offset), self.rope(k, offset)
        if past is not None:
            k, v = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
        cache = (k, v)
        # grouped queries: the `rep` query heads of one kv head share its keys and values
        # (a view over the heads, instead of repeating the cache `rep` times)
        rep, total = self.n_heads // self.n_kv_heads, k.shape[2]
        qg = q.reshape(b, self.n_kv_heads, rep * s, self.head_dim)
        scores = (qg @ k.transpose(-1, -2)).view(b, self.n_heads, s, total)
        scores = scores / math.sqrt(self.head_dim) if self.scale is None else scores * self.scale
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        windowed = self.window and total > self.window
        if key_padding_mask is not None or (self.causal and s > 1) or windowed:  # else every key is visible
            keep = torch.ones(s, total, dtype=torch.bool, device=x.device)
            qpos = torch.arange(offset, offset + s, device=x.device)[:, None]
            kpos = torch.arange(total, device=x.device)[None, :]
            if self.causal:
                keep = keep & (kpos <= qpos)
            if windowed:
                keep = keep & (kpos > qpos - self.window)
            keep = keep[None, None]
            if key_padding_mask is not None:
                keep = keep & key_padding_mask.bool()[:, None, None, :]
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), -1).to(q.dtype)
        out = (probs.view(b, self.n_kv_heads, rep * s, total) @ v).view(b, self.n_heads, s, self.head_dim)
        return self.o(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)), cache


_ACTIVATIONS = {
    "gelu": lambda t: F.gelu(t),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class RBEFFN(nn.Module):
    """Feed-forward block: ``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))`` with a gate,
    or the same with one fused ``gate_up`` projection whose output is [gate | up] (Phi-3)."""

    def __init__(self, up: nn.Module | None, down: nn.Module, gate: nn.Module | None = None,
                 activation: str = "gelu", *, gate_up: nn.Module | None = None):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(_ACTIVATIONS)}")
        if (gate_up is None) == (up is None):
            raise ValueError("give either up (and optionally gate), or a fused gate_up projection")
        if gate_up is not None and gate is not None:
            raise ValueError("a fused gate_up projection replaces gate and up")
        self.up, self.down, self.gate, self.gate_up, self.activation = up, down, gate, gate_up, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACTIVATIONS[self.activation]
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, -1)
            return self.down(act(gate) * up)
        h = act(self.gate(x)) * self.up(x) if self.gate is not None else act(self.up(x))
        return self.down(h)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama), uncompressed; computed in float32. The scale is ``weight +
    offset`` (Gemma's weights are offsets from 1: ``offset=1``, computed as ``x * (1 + w)`` in float32)."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.eps = eps
        self.offset = float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def layer_norm(weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> nn.LayerNorm:
    """An uncompressed ``nn.LayerNorm`` holding the given weight and bias."""
    ln = nn.LayerNorm(weight.shape[0], eps=eps, bias=bias is not None)
    with torch.no_grad():
        ln.weight.copy_(weight)
        if bias is not None:
            ln.bias.copy_(bias)
    return ln


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` (dotted) in ``model``'s module tree; ``ValueError`` for the root
    itself (name '')."""
    if not name:
        raise ValueError(f"cannot replace the model itself with a {type(new).__name__}; it must contain the layer")
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
