"""Text generation from any causal LM, without torch: sampling, the prompt-to-text loop, and
``NativeLM``, a causal LM that runs entirely in a backend's native engine.

``TextGeneration`` holds the loop; a class that mixes it in provides ``config`` (the normalised
model config), ``tokenizer`` and ``start``/``step`` (logits of a prompt / of one more token).
The torch modules (``rbe_core.models.common.CausalLM``) and ``NativeLM`` both do.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ..arrays import to_numpy_f32
from .spec import ModelError, Spec, WithTokenizer


def sample(logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> int:
    """A token id from ``logits`` (1-D, numpy or torch): greedy when ``temperature`` is 0, else
    sampled at that temperature from the ``top_k`` likeliest (0: all), then the smallest set of
    the likeliest whose probability reaches ``top_p``, by one uniform number from ``rng`` (the
    first token whose running probability passes it). Probabilities in float32, sums in float64;
    never a token of probability 0; ``ValueError`` when the logits are not finite. Every step is
    vectorised (over SmolLM2's 49152 tokens: ~0.1 ms; a float64 exp, a whole cumsum or a whole
    argpartition take ~0.5 ms each)."""
    z = to_numpy_f32(logits).reshape(-1)
    if temperature <= 0:
        return int(np.argmax(z))
    ids = None  # the candidates' token ids (None: every token, in order)
    if 0 < top_k < z.size:
        ids = _largest(z, top_k)
        z = z[ids]
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, refused by _draw
        p = np.exp((z - z.max()) / np.float32(temperature))
    if top_p < 1.0:
        head = _nucleus(p, top_p)
        ids, p = (head if ids is None else ids[head]), p[head]
    pick = _draw(p, rng if rng is not None else np.random.default_rng())
    return int(pick if ids is None else ids[pick])


def _largest(v: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` largest entries of ``v`` (in no order): a threshold from a strided
    sample of ``v`` leaves a few hundred candidates for ``argpartition``."""
    stride = v.size // 4096
    if stride >= 4 and m < v.size:
        sub = np.sort(v[::stride])
        t = sub[max(0, sub.size - 16 - 4 * (m // stride))]
        cand = np.flatnonzero(v >= t)
        if cand.size >= m:  # then the m largest are all among them
            return cand[np.argpartition(v[cand], cand.size - m)[cand.size - m:]]
    return np.argpartition(v, v.size - m)[v.size - m:] if m < v.size else np.arange(v.size)


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of the likeliest entries of ``p`` (unnormalised) whose share
    reaches ``top_p``, likeliest first: the 256 likeliest are sorted, all of them only when those
    do not reach it."""
    total = float(p.sum(dtype=np.float64))
    for m in (min(p.size, 256), p.size):
        top = _largest(p, m)
        top = top[np.argsort(-p[top], kind="stable")]
        mass = np.cumsum(p[top], dtype=np.float64)
        if mass[-1] >= top_p * total:
            break
    return top[:max(1, int(np.searchsorted(mass - p[top], top_p * total, side="left")))]


def _draw(p: np.ndarray, rng: np.random.Generator, block: int = 1024) -> int:
    """The index where the running sum of ``p`` (float32, unnormalised) first passes ``u`` times
    its total, ``u`` uniform in [0, 1): block sums first, then the running sum of one block."""
    starts = np.arange(0, p.size, block)
    sums = np.add.reduceat(p, starts, dtype=np.float64)
    running = np.cumsum(sums)
    if not np.isfinite(running[-1]) or running[-1] <= 0.0:
        raise ValueError("cannot sample: the logits are not finite")
    u = rng.random() * running[-1]
    b = int(np.searchsorted(running, u, side="right"))
    if b >= sums.size:  # u rounded up to the total: the last block with any mass
        b = int(np.flatnonzero(sums)[-1])
    part = p[starts[b]:starts[b] + block]
    inside = np.cumsum(part, dtype=np.float64)
    i = int(np.searchsorted(inside, u - (running[b] - sums[b]), side="right"))
    if i >= part.size:  # the same at the block's end
        i = int(np.flatnonzero(part)[-1])
    return int(starts[b]) + i


def sampler_rng(seed: int | None) -> np.random.Generator:
    """The random source of one generation: seeded (any integer) or fresh."""
    return np.random.default_rng(None if seed is None else seed % (2**63))


class TextGeneration(WithTokenizer):
    """Prompt in, tokens and text out, over the mixing class's ``start`` and ``step``."""

    spec: type[Spec]
    config: dict

    @property
    def context_length(self) -> int:
        return int(self.config["max_position"])

    @property
    def eos_ids(self) -> set[int]:
        eos = self.config.get("eos_token_id")
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    sample = staticmethod(sample)

    def embed(self, texts: list[str]):
        raise ModelError(f"{self.spec.name} models do not produce sentence embeddings; use generate()")

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        ids = list(prompt) if not isinstance(prompt, str) else self._require_tokenizer().encode(prompt).ids
        if not ids:
            raise ModelError("the prompt is empty")
        if len(ids) >= self.context_length:
            raise ModelError(f"the prompt is {len(ids)} tokens; the model's context is {self.context_length}")
        return ids

    def max_new_tokens(self, prompt_tokens: int, requested: int) -> int:
        """``requested`` clamped to the room the context leaves after ``prompt_tokens``."""
        return max(0, min(int(requested), self.context_length - prompt_tokens))

    def generate_ids(self, prompt: str | list[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
        """Yield new token ids one by one; stops at EOS (yielded), ``max_new_tokens`` or the context end."""
        ids = self.encode_prompt(prompt)
        rng = sampler_rng(seed)
        logits, state = self.start(ids)
        for i in range(self.max_new_tokens(len(ids), max_new_tokens)):
            tok = sample(logits, temperature, top_k, top_p, rng)
            yield tok
            if tok in self.eos_ids or len(ids) + i + 1 >= self.context_length:
                return
            logits, state = self.step(tok, state)

    def stream(self, prompt: str | list[int], max_new_tokens: int = 64, **kwargs) -> Iterator[str]:
        """Yield generated text pieces as they are decoded (EOS is not printed)."""
        tok = self._require_tokenizer()
        new: list[int] = []
        shown = ""
        for t in self.generate_ids(prompt, max_new_tokens, **kwargs):
            if t in self.eos_ids:
                break
            new.append(t)
            text = tok.decode(new, skip_special_tokens=False)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
                continue
            yield text[len(shown):]
            shown = text

    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, **kwargs) -> str:
        """The generated continuation of ``prompt`` as text."""
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))


class NativeSequences:
    """Sequences on a native engine (``Backend.native_decoder``), one per KV cache ``slot``
    (``engine.slots`` of them): starting another one in a slot invalidates earlier states of it."""

    def __init__(self, engine):
        self.engine = engine
        self.epochs: dict[int, int] = {}

    def start(self, ids: list[int], slot: int = 0) -> tuple[np.ndarray, tuple]:
        """The prompt's last-position logits (float32) and the state :meth:`step` continues."""
        logits = self.engine.forward(ids, 0, slot=slot)
        self.epochs[slot] = self.epochs.get(slot, 0) + 1
        return logits, (slot, self.epochs[slot], len(ids))

    def step(self, token: int, state: tuple) -> tuple[np.ndarray, tuple]:
        """Append one token to a sequence from :meth:`start`: its logits and the new state."""
        slot, epoch, length = state
        if epoch != self.epochs.get(slot):
            raise ModelError("this sequence was replaced by a newer start() in the same KV cache slot")
        logits = self.engine.forward([int(token)], length, slot=slot)
        return logits, (slot, epoch, length + 1)


class NativeLM(TextGeneration):
    """A causal LM whose every step runs in a backend's native engine: no torch modules, no torch.
    Logits are float32 numpy arrays. Built by ``rbe_core.models.loading.load_inference``."""

    engine_name = "native"

    def __init__(self, spec: type[Spec], config: Mapping[str, Any], tokenizer, engine):
        self.spec, self.config, self.tokenizer = spec, dict(config), tokenizer
        self.sequences = NativeSequences(engine)

    @property
    def native(self):
        """The native engine (``forward``, ``slots``, ``profile()``)."""
        return self.sequences.engine

    def start(self, ids: list[int], slot: int = 0) -> tuple[np.ndarray, tuple]:
        return self.sequences.start(ids, slot)

    def step(self, token: int, state: tuple) -> tuple[np.ndarray, tuple]:
        return self.sequences.step(token, state)
