"""The vLLM engine's tests: real `bentoml serve` with ``LLM_ENGINE=vllm`` on vLLM's CPU build
and the real default model. They run in the virtualenv `make test-vllm` makes (vLLM pins its
own torch and transformers); anywhere vLLM is not installed they are skipped, and say so."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from contract.settings import DEFAULT_MODEL
from tests.conftest import USER_BENTOML_HOME
from tests.e2e.test_serve import default_model_in_store
from tests.served import BENTOML, ServedProcess, free_port

pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` installs it")

# Small limits, so overload is reachable with a few dozen clients. vLLM's first start compiles
# the model (a minute or two here) and caches it, so later starts take about half a minute.
VLLM_ENV = {
    "LLM_ENGINE": "vllm",
    "LLM_MAX_BATCH_SIZE": "8",
    "LLM_RUNNER_MAX_IN_FLIGHT": "16",
    "LLM_VLLM_KV_CACHE_GIB": "1",
    "LLM_VLLM_MAX_MODEL_LEN": "4096",
}
START_TIMEOUT = 600


def serve_vllm(service: str, *extra: str, **env: str) -> ServedProcess:
    """`bentoml serve service:<service>` on the vLLM engine (not started yet)."""
    if not default_model_in_store():
        pytest.skip(f"{DEFAULT_MODEL} is not in {USER_BENTOML_HOME}: run `make model`")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    full_env.update(
        BENTOML_HOME=USER_BENTOML_HOME,
        BENTOML_DO_NOT_TRACK="true",
        HF_HUB_OFFLINE="1",  # the store's files only
        **VLLM_ENV,
        **env,
    )
    return ServedProcess(
        [BENTOML, "serve", f"service:{service}", *extra],
        port=free_port(),
        env=full_env,
        start_timeout=START_TIMEOUT,
    )


@pytest.fixture(scope="session")
def vllm_split() -> Iterator[ServedProcess]:
    """The split topology (ChatAPI + LLMRunner) on vLLM, shared by the tests that keep it up."""
    served = serve_vllm("ChatAPI")
    try:
        yield served.start()
    finally:
        served.close()
