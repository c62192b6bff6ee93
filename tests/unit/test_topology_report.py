"""The topology report's arithmetic on synthetic timings: busy fraction, cost per token,
the rows built from request records, and the report and plots written from them."""

from __future__ import annotations

import pytest

from bench.report import (
    Prices,
    busy_fraction,
    cost_per_million_tokens,
    hourly_cost,
    instances,
    make_row,
    markdown,
    plot,
    summary,
)
from bench.serving import RequestRecord, summarize

PRICES = Prices(gpu_instance_per_hour=0.80, cpu_instance_per_hour=0.08, cpu_instance_cores=2)


def test_busy_fraction_is_the_busy_seconds_over_the_wall_time():
    assert busy_fraction(10.0, 16.0, 8.0) == pytest.approx(0.75)
    assert busy_fraction(0.0, 0.0, 5.0) == 0.0  # an idle model
    assert busy_fraction(0.0, 9.0, 8.0) == 1.0  # clock skew never reads as more than all
    assert busy_fraction(16.0, 2.0, 8.0) is None  # the runner restarted: the counter reset
    assert busy_fraction(1.0, 2.0, 0.0) is None


def test_each_topology_pays_for_the_instances_it_occupies():
    assert instances("monolith", 4, PRICES) == {"gpu": 1, "cpu": 0}
    assert instances("split", 4, PRICES) == {"gpu": 1, "cpu": 0}
    assert instances("remote", 3, PRICES) == {"gpu": 1, "cpu": 2}  # one worker per core
    assert hourly_cost("remote", 3, PRICES) == pytest.approx(0.80 + 2 * 0.08)
    with pytest.raises(ValueError, match="unknown topology"):
        instances("mesh", 1, PRICES)


def test_cost_per_million_tokens():
    # 0.80 an hour at 100 tokens/s: 360,000 tokens an hour, 2.22 per million.
    assert cost_per_million_tokens(0.80, 100.0) == pytest.approx(0.80 / 0.36)
    assert cost_per_million_tokens(0.80, 200.0) == pytest.approx(cost_per_million_tokens(0.4, 100))
    assert cost_per_million_tokens(0.80, 0.0) is None


def _records() -> list[RequestRecord]:
    """Four requests over a 10 s run: three of 30 tokens (latencies 3.4, 4.4, 5.4 s; first
    tokens at 0.5, 1.5, 2.5 s), and one failure."""
    records = []
    for i in range(3):
        times = [0.5 + i + 0.1 * k for k in range(30)]
        records.append(RequestRecord(latency=times[-1], ttft=times[0], token_times=times,
                                     output_tokens=30))  # fmt: skip
    records.append(RequestRecord(latency=0.2, ttft=None, error="APIConnectionError"))
    return records


def test_a_row_from_synthetic_request_timings():
    result = summarize(_records(), wall=10.0)
    row = make_row(
        "remote", 20.0, 4, result, busy=busy_fraction(3.0, 7.5, 10.0), api_rss_mib=200.0,
        model_rss_mib=900.0, api_workers=2, prices=PRICES,
    )  # fmt: skip
    assert row.output_tokens_per_s == pytest.approx(9.0)  # 90 tokens in 10 s
    assert row.requests_per_s == pytest.approx(0.3) and row.errors == 1
    assert row.ttft_p50_s == pytest.approx(1.5) and row.latency_p95_s == pytest.approx(5.3)
    assert row.busy_fraction == pytest.approx(0.45)
    # 0.80 + 0.08 an hour for 9 tokens/s.
    assert row.cost_per_m_tokens == pytest.approx(0.88 / (9 * 3600) * 1e6)


def test_the_report_shows_every_point_and_a_summary(tmp_path):
    rows = []
    for topology, tokens_per_s, busy in [("monolith", 40.0, 0.5), ("split", 60.0, 0.8)]:
        for clients in (1, 8):
            result = summarize(_records(), wall=10.0)
            result["output_tokens_per_s"] = tokens_per_s * clients / 8
            rows.append(make_row(topology, 0.0, clients, result, busy=busy, api_rss_mib=None,
                                 model_rss_mib=500.0, api_workers=2, prices=PRICES))  # fmt: skip
    paths = plot(rows, tmp_path)
    assert [p.name for p in paths] == ["throughput.png", "busy.png", "latency.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    meta = {
        "command": "python -m bench.topology --clients 1,8", "machine": "test", "date": "today",
        "model": "tiny", "requests": 4, "min_tokens": 16, "max_tokens": 64, "api_workers": 2,
        "logic_ms": [0.0], "prices": PRICES, "prices_file": "bench/prices.yaml",
    }  # fmt: skip
    text = markdown(rows, meta, [str(p) for p in paths])
    assert text.count("\n| monolith |") == 2 and text.count("\n| split |") == 2
    assert "![throughput](throughput.png)" in text
    assert "python -m bench.topology --clients 1,8" in text
    line = summary(rows)
    assert "split 60.0 tok/s (8 clients, model busy 80%" in line
    assert "monolith 40.0 tok/s" in line


def test_a_report_renders_again_from_its_results_without_measuring(tmp_path):
    from bench.topology import render, rerender

    result = summarize(_records(), wall=10.0)
    rows = [make_row("split", 0.0, 2, result, busy=0.9, api_rss_mib=270.0, model_rss_mib=900.0,
                     api_workers=2, prices=PRICES)]  # fmt: skip
    meta = {
        "command": "python -m bench.topology", "machine": "m", "date": "d", "model": "tiny",
        "requests": 4, "min_tokens": 16, "max_tokens": 48, "api_workers": 2, "logic_ms": [0.0],
        "prices": PRICES, "prices_file": "bench/prices.yaml",
    }  # fmt: skip
    first = render(rows, meta, tmp_path).read_text()
    (tmp_path / "report.md").unlink()
    assert rerender(tmp_path / "results.json").read_text() == first
