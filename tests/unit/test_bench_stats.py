"""The serving benchmark's arithmetic, on synthetic timings."""

from __future__ import annotations

import pytest

from bench.serving import RequestRecord, make_workload, percentile, summarize


def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def test_summary_of_synthetic_requests():
    records = [
        RequestRecord(latency=1.0, ttft=0.2, token_times=[0.2, 0.4, 0.7], output_tokens=3),
        RequestRecord(latency=2.0, ttft=0.4, token_times=[0.4, 0.5], output_tokens=2),
        RequestRecord(latency=9.0, ttft=None, error="boom"),
    ]
    s = summarize(records, wall=2.5)
    assert s["requests"] == 3 and s["errors"] == 1
    assert s["output_tokens"] == 5
    assert s["output_tokens_per_s"] == pytest.approx(2.0)
    assert s["ttft_p50_s"] == pytest.approx(0.3)
    # inter-token gaps: 0.2, 0.3 (first request) and 0.1 (second)
    assert s["itl_p50_s"] == pytest.approx(0.2)
    assert s["latency_p95_s"] == pytest.approx(1.95)


def test_workload_is_seeded_and_within_bounds():
    a = make_workload(20, min_tokens=16, max_tokens=128, seed=3)
    assert a == make_workload(20, min_tokens=16, max_tokens=128, seed=3)
    assert a != make_workload(20, min_tokens=16, max_tokens=128, seed=4)
    assert all(16 <= w.max_tokens <= 128 for w in a)
    assert len({len(w.prompt) for w in a}) > 5  # mixed prompt lengths
