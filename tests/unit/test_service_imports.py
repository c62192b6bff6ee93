"""What importing service.py loads. `bentoml serve service:ChatAPI` imports it in every
worker, the runner's included: the API's request path (the tokenizer, the JSON-Schema
validator, aiohttp) must load in the API's workers only, not in the process that holds the
model (17 MiB of its memory at idle)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.served import ROOT

API_ONLY = ("aiohttp", "tokenizers", "jsonschema", "logic.chat", "api.runner_client")

SCRIPT = """
import json, sys
import service
print(json.dumps(sorted(m for m in sys.modules if m in sys.argv[1:])))
"""


def _loaded(script: str) -> list[str]:
    """Which of API_ONLY are in sys.modules after ``script`` runs in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", script, *API_ONLY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_service_module_leaves_the_api_request_path_unloaded():
    loaded = _loaded(SCRIPT)
    assert loaded == [], f"service.py loads the API's request path at import: {loaded}"


def test_an_api_worker_loads_it_when_it_starts():
    # What ChatAPI's __init__ and its runner client import: the names above are real modules
    # of the request path, so the check above is not vacuous.
    script = SCRIPT.replace(
        "import service",
        "import service\nimport api.runner_client, logic.chat\nservice._runner_transport_errors()",
    )
    assert _loaded(script) == sorted(API_ONLY)
