"""`make gpu-check`'s benchmark (bench.gpu) on a tiny model on the CPU, so the script that
runs on a borrowed GPU, where nothing can be fixed on the spot, is known to run end to end."""

from __future__ import annotations

import json

from bench import gpu


def test_the_gpu_benchmark_runs_end_to_end_and_writes_its_report(tmp_path):
    assert gpu.main(["--smoke", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    ours, theirs = results["ours"], results["transformers"]
    assert ours["output_tokens"] == 8 * 8  # every request ran to its full length
    assert theirs["output_tokens"] == 8 * 8, theirs  # the anchor ran too, same tokens
    assert results["ratio_vs_transformers"] > 0
    assert {g["kind"] for g in results["step_grid"]} == {"decode", "prefill"}
    report = (tmp_path / "report.md").read_text()
    assert "transformers generate_batch" in report and "Step times" in report
