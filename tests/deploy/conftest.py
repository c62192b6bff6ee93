"""One Bento, built once per session from this tree into the tests' BENTOML_HOME, with the
tiny model. Building locks the Bento's packages with uv against the package registry."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_MODEL
from tests.served import BENTOML, ROOT

# Build-time settings the Bento must record (the defaults are tested by leaving them out).
BUILD_ENV = {
    "LLM_MODEL": TINY_MODEL,
    "LLM_API_WORKERS": "3",
    "LLM_RUNNER_GPU_TYPE": "nvidia-l4",
    "LLM_RUNNER_MEMORY": "24Gi",
    "LLM_RUNNER_URL": "",  # one exported in the shell would make an API-only Bento
    "LLM_TORCH_WHEEL": "",
}


@dataclass(frozen=True)
class BuiltBento:
    tag: str
    path: Path
    manifest: dict


def build_bento(env: dict[str, str], *args: str) -> BuiltBento:
    """`bentoml build ARGS` of this tree into the tests' store, with ``env`` on top."""
    result = subprocess.run(
        [BENTOML, "build", "--output", "tag", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tag = re.search(r"__tag__:(\S+)", result.stdout).group(1)
    name, version = tag.split(":")
    path = Path(os.environ["BENTOML_HOME"]) / "bentos" / name / version
    return BuiltBento(tag, path, yaml.safe_load((path / "bento.yaml").read_text()))


@pytest.fixture(scope="session")
def bento(tiny_model_tag: str) -> BuiltBento:
    return build_bento(BUILD_ENV, "--label", "stage=test")
