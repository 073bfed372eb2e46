"""Sampling (``rbe_core.models.generation.sample``): greedy, top-k, top-p, temperature, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from rbe_core.models.generation import sample, sampler_rng

LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))


def test_greedy_takes_the_first_maximum():
    assert sample(np.array([1.0, 3.0, 3.0, 0.0], np.float32)) == 1


@pytest.mark.parametrize("options", [{"top_k": 1}, {"top_p": 0.4}])
def test_filters_down_to_one_token_are_greedy(options):
    assert {sample(LOGITS, 1.0, rng=sampler_rng(s), **options) for s in range(50)} == {0}


def test_top_k_and_top_p_keep_only_the_head():
    assert {sample(LOGITS, 1.0, top_k=2, rng=sampler_rng(s)) for s in range(200)} == {0, 1}
    assert {sample(LOGITS, 1.0, top_p=0.7, rng=sampler_rng(s)) for s in range(200)} == {0, 1}


def test_frequencies_follow_the_softmax():
    rng = sampler_rng(7)
    counts = np.bincount([sample(LOGITS, 1.0, rng=rng) for _ in range(4000)], minlength=4) / 4000
    assert np.allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_a_seed_reproduces_and_any_integer_is_a_seed():
    draws = [[sample(LOGITS, 2.0, rng=rng) for _ in range(20)] for rng in (sampler_rng(3), sampler_rng(3))]
    assert draws[0] == draws[1]
    sample(LOGITS, 1.0, rng=sampler_rng(10**5000))


def test_torch_logits_are_accepted():
    torch = pytest.importorskip("torch")
    assert sample(torch.tensor([0.0, 2.0, 1.0])) == 1


def _vocab_logits(seed: int = 0, size: int = 49152) -> np.ndarray:
    """A real vocabulary's size: a few likely tokens over a long tail, ties included."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal(size) * 2.0).astype(np.float32)
    z[rng.choice(size, 30, replace=False)] += 9.0
    z[:200] = np.round(z[:200])  # repeated values
    return z


@pytest.mark.parametrize("top_k", [1, 40, 1000, 30000])
def test_top_k_over_a_whole_vocabulary(top_k):
    """The candidates are exactly the top_k largest logits (by value), every draw among them."""
    from rbe_core.models.generation import _largest

    z = _vocab_logits()
    kth = np.sort(z)[-top_k]
    got = _largest(z, top_k)
    assert got.size == top_k and np.unique(got).size == top_k and (z[got] >= kth).all()
    assert (np.sort(z[got]) == np.sort(z)[-top_k:]).all()
    rng = sampler_rng(1)
    assert all(z[sample(z, 1.0, top_k=top_k, rng=rng)] >= kth for _ in range(300))


def test_top_k_when_the_sample_threshold_leaves_too_few():
    """The strided sample's threshold can leave fewer than top_k candidates (every sampled entry
    large): the whole vocabulary is searched then."""
    from rbe_core.models.generation import _largest

    z = np.zeros(49152, np.float32)
    z[::12] = 5.0
    z[5] = 7.0
    got = _largest(z, 10000)
    assert got.size == 10000 and 5 in got and (np.sort(z[got]) == np.sort(z)[-10000:]).all()


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999])
def test_top_p_over_a_whole_vocabulary(top_p):
    """Draws stay in the smallest set of the likeliest tokens whose probability reaches top_p
    (reference: the whole distribution sorted), and follow the renormalised probabilities."""
    z = _vocab_logits(2)
    p = np.exp(z.astype(np.float64) - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    nucleus = set(order[np.cumsum(p[order]) - p[order] < top_p].tolist())
    rng = sampler_rng(4)
    draws = [sample(z, 1.0, top_p=top_p, rng=rng) for _ in range(400)]
    assert set(draws) <= nucleus
    best = order[0]
    share = p[best] / p[list(nucleus)].sum()
    assert abs(draws.count(best) / len(draws) - share) < 0.075  # 3 standard deviations


def test_masked_tokens_are_never_drawn_and_bad_logits_are_refused():
    """Logits at -inf (a grammar's mask) have probability 0 and are never drawn, wherever they
    sit; logits with NaN or +inf are a ValueError, not a token."""
    z = np.full(49152, -np.inf, np.float32)
    allowed = np.array([3, 1023, 1024, 2047, 49151])
    z[allowed] = [0.0, 1.0, -1.0, 2.0, 0.5]
    rng = sampler_rng(5)
    assert {sample(z, 1.5, rng=rng) for _ in range(2000)} == set(allowed.tolist())
    for bad in (np.nan, np.inf):
        broken = _vocab_logits()
        broken[7] = bad
        with pytest.raises(ValueError, match="not finite"):
            sample(broken, 1.0, rng=rng)


def test_frequencies_follow_the_softmax_over_a_whole_vocabulary():
    z = _vocab_logits(3)
    p = np.exp(z.astype(np.float64) - z.max())
    p /= p.sum()
    rng = sampler_rng(6)
    draws = np.bincount([sample(z, 1.0, rng=rng) for _ in range(6000)], minlength=z.size) / 6000
    top = np.argsort(-p)[:5]
    assert np.allclose(draws[top], p[top], atol=0.02)
