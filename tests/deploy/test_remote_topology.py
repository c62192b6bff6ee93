"""The remote topology from one Bento: the runner served alone, the API served alone and
pointed at the runner's URL, as two process trees on two ports (as on two hosts).

Both are started the way a container of the Bento starts them (`start-http-server`), from the
Bento in the store, not from this source tree. The environment carries no LLM_* settings:
the Bento's recorded env says which model to serve.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import TINY_MODEL
from tests.deploy.conftest import BuiltBento
from tests.served import START_HTTP_SERVER, ServedProcess, free_port, samples

CHAT = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    return {**env, "LLM_API_WORKERS": "1", "BENTOML_DO_NOT_TRACK": "true"}


def _serve(bento: BuiltBento, *args: str) -> ServedProcess:
    """One service of the Bento, started the way its container would start it."""
    return ServedProcess([*START_HTTP_SERVER, bento.tag, *args], port=free_port(), env=_env())


@pytest.fixture
def runner(bento: BuiltBento) -> Iterator[ServedProcess]:
    with _serve(bento, "--service-name", "LLMRunner") as served:
        yield served


@pytest.fixture
def api(bento: BuiltBento, runner: ServedProcess) -> Iterator[ServedProcess]:
    with _serve(bento, "--depends", f"LLMRunner={runner.url}") as served:
        yield served


def _post(api: ServedProcess) -> httpx.Response:
    return httpx.post(f"{api.url}/v1/chat/completions", json=CHAT, timeout=60)


def test_requests_flow_from_the_api_to_a_runner_it_was_pointed_at(api, runner):
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(**CHAT)
    assert completion.usage.completion_tokens > 0
    assert completion.choices[0].finish_reason in {"stop", "length"}

    # The API process tree runs no runner: only the runner's tree has the model loaded.
    api_commands = [" ".join(p.cmdline()) for p in api.process.children(recursive=True)]
    assert api_commands and not any("LLMRunner" in c for c in api_commands)
    metrics = httpx.get(f"{runner.url}/metrics", timeout=10).text
    values = samples(metrics)
    assert values[("llm_runner_requests_in_flight", ())] == 0
    assert values[("llm_runner_requests_finished_total", ())] >= 1


def test_without_its_runner_the_api_answers_503_quickly_and_recovers_when_it_is_back(api, runner):
    assert _post(api).status_code == 200
    runner.stop()

    started = time.monotonic()
    refused = _post(api)
    assert time.monotonic() - started < 5
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "runner_unavailable"
    assert "runner" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) > 0
    # Streams too get a status, not a broken event stream.
    streamed = httpx.post(
        f"{api.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60
    )
    assert streamed.status_code == 503
    # The API stays up: alive, but not ready while its runner is away.
    assert httpx.get(f"{api.url}/livez", timeout=5).status_code == 200
    assert httpx.get(f"{api.url}/readyz", timeout=10).status_code == 503
    assert api.proc.poll() is None

    runner.start()  # same host and port, the API untouched
    deadline = time.monotonic() + 30
    while (response := _post(api)).status_code != 200:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.5)
    assert response.json()["usage"]["completion_tokens"] > 0
    assert httpx.get(f"{api.url}/readyz", timeout=10).status_code == 200
