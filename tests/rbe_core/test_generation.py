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
