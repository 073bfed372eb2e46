"""The Prometheus text of ``Metrics``: counters in full, cumulative histograms with their own buckets."""

from __future__ import annotations

from rbe_core.serve.metrics import Metrics


def _samples(text: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_counters_and_sums_are_printed_in_full():
    m = Metrics()
    m.add("generation_tokens", 1234567)
    m.add("prompt_tokens", 2.5)
    m.observe_round(0.004, 7, 1234567)
    s = _samples(m.render())
    assert s["rbe_generation_tokens_total"] == "1234567"
    assert s["rbe_prompt_tokens_total"] == "2.5"
    assert s["rbe_engine_round_tokens_sum"] == "1234567"
    assert float(s["rbe_engine_round_seconds_sum"]) == 0.004


def test_round_histograms_count_each_round_in_its_bucket():
    m = Metrics()
    for sequences in (1, 2, 3, 8, 8, 9, 5000):
        m.observe_round(0.01, sequences, sequences)
    s = _samples(m.render())
    cumulative = {le: int(s[f'rbe_engine_round_sequences_bucket{{le="{le}"}}']) for le in ("1", "2", "4", "8", "16", "2048", "+Inf")}
    assert cumulative == {"1": 1, "2": 2, "4": 3, "8": 5, "16": 6, "2048": 6, "+Inf": 7}
    assert s["rbe_engine_round_sequences_count"] == "7"
    assert s["rbe_engine_round_sequences_sum"] == str(1 + 2 + 3 + 8 + 8 + 9 + 5000)
    assert s['rbe_engine_round_seconds_bucket{le="0.01"}'] == "7"  # a bound holds what equals it
    assert s['rbe_engine_round_seconds_bucket{le="0.005"}'] == "0"


def test_histograms_are_exported_before_any_observation():
    s = _samples(Metrics().render())
    assert s["rbe_engine_round_seconds_count"] == "0" and s['rbe_engine_round_tokens_bucket{le="+Inf"}'] == "0"
    assert s["rbe_ttft_seconds_sum"] == "0"
