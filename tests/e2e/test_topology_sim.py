"""`make bench-topology-sim` on a tiny grid: the three topologies served for real on the
SIMULATED GPU, measured, and reported (the full grid's report is
docs/topology/simulated-gpu/)."""

from __future__ import annotations

import json
import os

import pytest

from contract.settings import DEFAULT_MODEL
from tests.conftest import USER_BENTOML_HOME
from tests.e2e.test_serve import default_model_in_store
from tests.served import free_port


def test_the_topology_report_runs_on_the_simulated_gpu(tmp_path, monkeypatch):
    if not default_model_in_store():
        pytest.skip(f"{DEFAULT_MODEL} is not in {USER_BENTOML_HOME}: run `make model`")
    from bench import topology

    for name in [k for k in os.environ if k.startswith("LLM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("BENTOML_HOME", USER_BENTOML_HOME)
    port = free_port()
    status = topology.main([
        "--device", "simulated", "--clients", "1,4", "--logic-ms", "20", "--post-share", "0.5",
        "--requests", "8", "--min-tokens", "8", "--max-tokens", "16", "--port", str(port),
        "--out", str(tmp_path),
    ])  # fmt: skip
    assert status == 0  # no request failed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["device"].startswith("simulated: Llama-3-8B")
    assert results["latency_model"]["decode_ms_1x1024"] > 0
    rows = results["rows"]
    assert {r["topology"] for r in rows} == {"monolith", "split", "remote"}
    assert {r["clients"] for r in rows} == {1, 4}
    for row in rows:
        # The simulated device's own busy time: real, and never more than the wall time.
        assert 0 < row["busy_fraction"] <= 1
        assert row["output_tokens_per_s"] > 0 and row["errors"] == 0
    report = (tmp_path / "report.md").read_text()
    assert "SIMULATED GPU" in report and "## Where the split pays" in report
    assert (tmp_path / "throughput.png").stat().st_size > 0
