"""The llama.cpp engine's tests: our engine's scheduler over llama.cpp on the default model's
GGUF, in process and through real `bentoml serve`. They run in the virtualenv
`make test-llamacpp` makes (llama-cpp-python compiled once); anywhere it is not installed
they are skipped, and say so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from contract.settings import DEFAULT_MODEL
from tests.conftest import USER_BENTOML_HOME
from tests.e2e.test_serve import default_model_in_store
from tests.served import BENTOML, ServedProcess, free_port

pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed here: `make test-llamacpp` builds it"
)

# Small limits, so overload is reachable with a few dozen clients.
LLAMACPP_ENV = {
    "LLM_ENGINE": "llamacpp",
    "LLM_MAX_BATCH_SIZE": "8",
    "LLM_RUNNER_MAX_IN_FLIGHT": "16",
}
START_TIMEOUT = 300


def store_entry() -> Path:
    """The default model's store entry `latest` points at (what `bentoml serve` loads)."""
    if not default_model_in_store():
        pytest.skip(f"{DEFAULT_MODEL} is not in {USER_BENTOML_HOME}: run `make model`")
    models = Path(USER_BENTOML_HOME) / "models" / DEFAULT_MODEL
    entry = models / (models / "latest").read_text().strip()
    if not any(entry.glob("*.gguf")):
        pytest.skip(f"{entry} keeps no GGUF: run `make model` (it adds it)")
    return entry


def serve_llamacpp(service: str, *extra: str, **env: str) -> ServedProcess:
    """`bentoml serve service:<service>` on the llama.cpp engine (not started yet)."""
    store_entry()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    full_env.update(
        BENTOML_HOME=USER_BENTOML_HOME,
        BENTOML_DO_NOT_TRACK="true",
        HF_HUB_OFFLINE="1",
        **LLAMACPP_ENV,
        **env,
    )
    return ServedProcess(
        [BENTOML, "serve", f"service:{service}", *extra],
        port=free_port(),
        env=full_env,
        start_timeout=START_TIMEOUT,
    )


@pytest.fixture(scope="session")
def llamacpp_split():
    """The split topology (ChatAPI + LLMRunner) on llama.cpp, shared by the tests that keep
    it up."""
    served = serve_llamacpp("ChatAPI")
    try:
        yield served.start()
    finally:
        served.close()
