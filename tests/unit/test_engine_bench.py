"""The engine benchmark's arithmetic (bench.suite, bench.engines) on synthetic runs: the
ratios, which targets are met, missed or only shown, and the in-process timing harness."""

from __future__ import annotations

import asyncio

import pytest

from bench.engines import run_names, run_streams
from bench.serving import RequestRecord
from bench.suite import (
    TARGETS,
    check,
    checks_of,
    latency_comparisons,
    ratio,
    run_name,
    target_values,
    targets_markdown,
)

N = 8


def run(tok_s: float, ttft: float = 0.1) -> dict:
    return {"output_tokens_per_s": tok_s, "ttft_p50_s": ttft}


def records(*latencies: float, tokens: int = 10) -> list[RequestRecord]:
    return [RequestRecord(latency=s, ttft=0.1, output_tokens=tokens) for s in latencies]


def test_ratio_of_two_runs_and_what_is_missing():
    results = {"a": run(120.0, 0.3), "b": run(100.0, 0.2), "zero": run(0.0)}
    assert ratio(results, "a", "b") == pytest.approx(1.2)
    assert ratio(results, "a", "b", "ttft_p50_s") == pytest.approx(1.5)
    assert ratio(results, "a", "absent") is None
    assert ratio(results, "absent", "b") is None
    assert ratio(results, "a", "zero") is None


def test_check_verdicts():
    assert check(0.96, 0.95, "min") == "met"
    assert check(0.94, 0.95, "min") == "MISSED"
    assert check(1.1, 1.1, "max") == "met"
    assert check(1.2, 1.1, "max") == "MISSED"
    assert check(None, 0.95, "min") == "not measured"
    assert check(3.0, None, "info") == "info"
    assert check(None, None, "info") == "not measured"


def test_the_issues_targets_have_their_bounds():
    assert TARGETS["vllm_throughput_vs_vllm_serve"][1:] == (0.95, "min")
    assert TARGETS["vllm_ttft_vs_vllm_serve"][1:] == (1.1, "max")
    # Our engine against vLLM's CPU build, in process and served, many streams and one.
    for key in ("in_process_native_vs_vllm", "in_process_single_native_vs_vllm",
                "served_native_vs_vllm_serve"):  # fmt: skip
        assert TARGETS[key][1:] == (1.0, "min")
    assert TARGETS["served_latency_native_vs_vllm_serve"][1:] == (1.0, "max")
    assert TARGETS["prefix_ttft_ours"][1:] == (0.1, "max")
    assert TARGETS["split_native_vs_vllm"][1:] == (None, "info")


def full_results() -> dict[str, dict]:
    native_n, vllm_n = (run_names(engine, N)[0] for engine in ("native", "vllm"))
    return {
        run_name("ours", N): run(130.0, 0.2),
        run_name("transformers serve", N): run(100.0),
        run_name("vllm serve", N): run(100.0, 0.2),
        run_name("ours on vLLM", N): run(96.0, 0.23),
        native_n: run(140.0),
        vllm_n: run(70.0),
        "sequential_generate": run(26.0),
    }


def test_target_values_from_synthetic_runs():
    drops = {"ours": {"ratio": 1.1}, "ours on vLLM": {"ratio": 3.0}}
    latency = {"vllm_latency_vs_vllm_serve": {"ratio": 1.02}}
    values = target_values(full_results(), latency, drops, N)
    assert set(values) == set(TARGETS)
    assert values["throughput_vs_peer"] == pytest.approx(1.3)
    assert values["throughput_vs_sequential"] == pytest.approx(5.0)
    assert values["vllm_throughput_vs_vllm_serve"] == pytest.approx(0.96)
    assert values["vllm_ttft_vs_vllm_serve"] == pytest.approx(1.15)
    assert values["split_native_vs_vllm"] == pytest.approx(130 / 96)
    assert values["in_process_native_vs_vllm"] == pytest.approx(2.0)
    assert values["latency_after_drop"] == pytest.approx(1.1)
    assert values["vllm_latency_after_drop"] == pytest.approx(3.0)
    assert values["vllm_latency_vs_vllm_serve"] == pytest.approx(1.02)
    assert values["latency_vs_generate"] is None  # not compared: not measured

    checks = checks_of(values)
    assert checks["vllm_throughput_vs_vllm_serve"]["verdict"] == "met"
    assert checks["vllm_ttft_vs_vllm_serve"]["verdict"] == "MISSED"  # 1.15 > 1.1
    assert checks["vllm_latency_after_drop"]["verdict"] == "info"  # shown, never judged
    assert checks["latency_vs_generate"]["verdict"] == "not measured"

    table = "\n".join(targets_markdown(checks, N))
    assert f"| {N} clients: output tok/s, ours on vLLM / vllm serve | 0.96 | >= 0.95 | met |" in (
        table
    )
    assert f"| {N} clients: TTFT p50, ours on vLLM / vllm serve | 1.15 | <= 1.1 | MISSED |" in (
        table
    )
    assert "| 1-client latency, ours / in-process generate | - | <= 1.05 | not measured |" in table


def test_without_vllm_its_targets_are_not_measured():
    results = {k: v for k, v in full_results().items() if "vLLM" not in k and "vllm" not in k}
    checks = checks_of(target_values(results, {}, {}, N))
    assert checks["throughput_vs_peer"]["verdict"] == "met"
    for key in ("vllm_throughput_vs_vllm_serve", "vllm_ttft_vs_vllm_serve",
                "split_native_vs_vllm", "in_process_native_vs_vllm"):  # fmt: skip
        assert checks[key]["verdict"] == "not measured"


def test_latency_comparisons_pair_the_runs_that_exist():
    found = latency_comparisons(
        {
            run_name("ours on vLLM", 1): records(1.0, 2.0),
            run_name("vllm serve", 1): records(1.0, 1.0),
            "sequential_generate": records(3.0),
        },
        N,
    )
    assert set(found) == {"vllm_latency_vs_vllm_serve"}  # the others lack a side
    assert found["vllm_latency_vs_vllm_serve"]["ratio"] == pytest.approx(1.5)
    assert found["vllm_latency_vs_vllm_serve"]["requests_compared"] == 2


def test_in_process_streams_are_timed_and_run_concurrently():
    active, peak = 0, 0

    async def stream(ids: list[int], max_tokens: int):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            for _ in range(max_tokens):
                await asyncio.sleep(0.005)
                yield 1
        finally:
            active -= 1

    async def fail(ids: list[int], max_tokens: int):
        raise RuntimeError("engine down")
        yield 0  # pragma: no cover - makes this an async generator

    summary, recs = asyncio.run(run_streams(stream, [[1]] * 6, [3, 4, 5, 3, 4, 5], 3))
    assert peak == 3  # never more than the concurrency
    assert summary["requests"] == 6 and summary["errors"] == 0
    assert summary["output_tokens"] == 24
    assert [r.output_tokens for r in recs] == [3, 4, 5, 3, 4, 5]  # in workload order
    assert all(r.ttft is not None and 0 < r.ttft <= r.latency for r in recs)
    assert all(len(r.token_times) == r.output_tokens for r in recs)

    summary, recs = asyncio.run(run_streams(fail, [[1]], [3], 1))
    assert summary["errors"] == 1 and recs[0].error == "RuntimeError: engine down"


def test_turn_by_turn_rounds_give_the_llamacpp_targets():
    """bench.paired: each round's own ratio, rounds of unequal work left out; the medians
    are the llama.cpp targets, the one-after-the-other ratios only shown."""
    from bench.paired import round_ratios, summary

    ours = records(1.1, 2.4, 0.9) + [RequestRecord(latency=9.0, ttft=0.1, output_tokens=3)]
    theirs = records(1.0, 2.0, 1.0, 1.0)
    ratios, differing = round_ratios(ours, theirs)
    assert ratios == pytest.approx([1.1, 1.2, 0.9]) and differing == 1
    latency = summary(ratios, differing)
    assert latency["median"] == pytest.approx(1.1) and latency["rounds"] == 3
    paired = {"latency_1_client": latency, f"throughput_{N}_clients": summary([0.9, 1.0, 1.2])}
    checks = checks_of(target_values({}, {}, {}, N, None, paired))
    assert checks["paired_llamacpp_latency"]["verdict"] == "met"  # 1.1 <= 1.1
    assert checks["paired_llamacpp_throughput"]["verdict"] == "met"  # median 1.0
    assert checks["llamacpp_latency_vs_llama_server"]["verdict"] == "not measured"
    worse = {"latency_1_client": summary([1.3, 1.2, 1.25])}
    assert (
        checks_of(target_values({}, {}, {}, N, None, worse))["paired_llamacpp_latency"]["verdict"]
        == "MISSED"
    )


def test_llamacpp_memory_ratios_at_idle_after_the_run_and_settled():
    def memory(runner: float | None, whole: float) -> dict:
        found = {"all_mib": whole}
        if runner is not None:
            found["runner_mib"] = runner
        return found

    results = {
        run_name("llama-server", N): {
            **run(100.0),
            "memory_idle": memory(None, 300.0),
            "memory": memory(None, 350.0),
            "memory_settled": memory(None, 380.0),
        },
        run_name("ours on llama.cpp", N): {
            **run(98.0),
            "memory_idle": memory(396.0, 800.0),
            "memory": memory(476.0, 900.0),
            "memory_settled": memory(475.0, 900.0),
        },
    }
    values = target_values(results, {}, {}, N, None, None, 96.0)
    assert values["llamacpp_runner_memory_vs_llama_server"] == pytest.approx(476 / 350)
    assert values["llamacpp_memory_vs_llama_server"] == pytest.approx(900 / 350)
    assert values["llamacpp_runner_memory_idle"] == pytest.approx(396 / 300)
    assert values["llamacpp_runner_memory_settled"] == pytest.approx(475 / 380)
    assert values["llamacpp_runner_overhead_vs_bare_bentoml"] == pytest.approx(1.0)
    checks = checks_of(values)
    assert checks["llamacpp_runner_memory_vs_llama_server"]["verdict"] == "MISSED"  # 1.36
    assert checks["llamacpp_runner_memory_idle"]["verdict"] == "info"
    # No bare worker measured: that ratio is not measured, the others still are.
    assert target_values(results, {}, {}, N)["llamacpp_runner_overhead_vs_bare_bentoml"] is None
