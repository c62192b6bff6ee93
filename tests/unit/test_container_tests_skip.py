"""`make test-containers` without a Docker engine: every test is skipped and says why, and
the run passes (so a machine without Docker, like CI's, gets a plain answer, not a failure)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.served import ROOT


def test_without_a_reachable_engine_the_container_tests_skip_saying_why(tmp_path):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/containers", "-m", "containers", "-rs", "-q",
         "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "passed" not in result.stdout and " skipped" in result.stdout
    assert "container tests need a Docker engine" in result.stdout
