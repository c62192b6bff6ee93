"""The images, built and run for real: the remote topology as two containers (the runner's
image and the API's image, which has no torch and no weights), the runner killed and started
again under the API, the all-in-one image, and deploy/compose.yaml brought up on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import time

import httpx
import pytest
from openai import OpenAI

from contract.settings import DEFAULT_MODEL, TOKENIZER_SUFFIX
from tests.containers.conftest import COMPOSE, FIGURES, RUNNER_HOST, Container, Images, docker
from tests.e2e.test_faults import Outcome, _start, _stream, _whole, assert_failed_fast
from tests.served import ROOT, free_port, scrape

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _ask(url: str) -> str:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=QUESTION, max_tokens=16, temperature=0
    )
    return answer.choices[0].message.content


def _ask_streamed(url: str) -> str:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


# ---------------------------------------------------------------- the API image alone


def test_the_api_image_has_no_torch_no_weights_and_stays_under_a_gigabyte(images: Images):
    image = images.api()
    found = docker(
        "run", "--rm", "--entrypoint", "python", image, "-c",
        "import importlib.util as u; print([m for m in ('torch', 'transformers', 'xgrammar',"
        " 'safetensors', 'vllm') if u.find_spec(m)])",
    )  # fmt: skip
    assert found.stdout.strip() == "[]"
    weights = docker(
        "run", "--rm", "--entrypoint", "sh", image, "-c",
        "find / -xdev -type f \\( -name '*.safetensors' -o -name '*.gguf' -o -name '*.pt'"
        " -o -name '*.bin' -size +1M \\) 2>/dev/null; ls /home/bentoml/bento/models",
    )  # fmt: skip
    # No weight file anywhere; the one store entry packed is the tokenizer's.
    assert weights.stdout.split() == [f"{DEFAULT_MODEL}{TOKENIZER_SUFFIX}"], weights.stdout
    size = int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
    assert size < 1e9, f"the API image is {size / 1e6:.0f} MB"


# ---------------------------------------------------------------- remote topology


@pytest.fixture(scope="module")
def topology(images: Images, run_container):
    """The runner's container, and the API's in front of it (found by its network name)."""
    api_image, runner_image = images.api(), images.runner()
    runner = run_container(
        "llm-test-runner", runner_image, alias=RUNNER_HOST, env={"LLM_DEVICE": "cpu"}
    )
    FIGURES["runner container: docker run to /readyz (s)"] = round(runner.ready(), 1)
    started = time.monotonic()
    api = run_container("llm-test-api", api_image)  # its image's LLM_RUNNER_URL: the runner
    FIGURES["API container: docker run to /livez (s)"] = round(api.ready("/livez"), 2)
    api.ready("/readyz")
    FIGURES["API container: docker run to /readyz, runner up (s)"] = round(
        time.monotonic() - started, 2
    )
    return api, runner


def test_the_api_container_answers_through_the_runner_container_whole_and_streamed(topology):
    api, _ = topology
    assert "Paris" in _ask(api.url)
    assert "Paris" in _ask_streamed(api.url)
    assert httpx.get(f"{api.url}/v1/models", timeout=10).json()["data"][0]["id"]


def test_readyz_and_metrics_on_both_containers(topology):
    api, runner = topology
    _ask(api.url)
    for container in (api, runner):
        assert httpx.get(f"{container.url}/readyz", timeout=10).status_code == 200
        assert httpx.get(f"{container.url}/livez", timeout=10).status_code == 200
    api_metrics, runner_metrics = scrape(api.url), scrape(runner.url)
    assert any(name.startswith("llm_api_") for name, _ in api_metrics), sorted(api_metrics)[:20]
    # The runner's series come from its own port; the API does not repeat a remote runner's.
    assert not any(name.startswith("llm_runner_") for name, _ in api_metrics)
    assert runner_metrics[("llm_runner_engine_up", ())] == 1
    assert runner_metrics[("llm_runner_requests_finished_total", ())] > 0


def _held(runner: Container) -> float:
    metrics = scrape(runner.url)
    return (
        metrics[("llm_runner_requests_running", ())] + metrics[("llm_runner_requests_waiting", ())]
    )


def test_a_runner_container_killed_mid_answer_gives_503s_then_the_api_recovers(topology):
    api, runner = topology
    outcomes = [Outcome() for _ in range(2)]
    whole = Outcome()
    threads = [_start(_stream, api.url, 1000, o) for o in outcomes]
    threads.append(_start(_whole, api.url, 1000, whole))
    for outcome in outcomes:
        assert outcome.first_token.wait(60) and outcome.error is None
    deadline = time.monotonic() + 60
    while _held(runner) < 3:
        assert time.monotonic() < deadline, "the runner never held all three requests"
        time.sleep(0.05)

    killed = time.monotonic()
    docker("kill", "--signal", "KILL", runner.name)
    assert_failed_fast(threads, outcomes, whole, killed)

    # While it is away: the API lives, is not ready, and answers 503 with Retry-After.
    assert httpx.get(f"{api.url}/livez", timeout=5).status_code == 200
    assert httpx.get(f"{api.url}/readyz", timeout=5).status_code == 503
    away = httpx.post(
        f"{api.url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 8}, timeout=30
    )
    assert away.status_code == 503 and int(away.headers["retry-after"]) >= 1
    assert away.json()["error"]["code"] == "runner_unavailable"

    # Started again, the same API (never restarted) is ready and answers within a minute.
    api_started = docker("inspect", "-f", "{{.State.StartedAt}}", api.name).stdout
    docker("start", runner.name)
    runner.ready()
    FIGURES["API ready again after the runner container restarted (s)"] = round(
        api.ready(timeout=60), 2
    )
    assert "Paris" in _ask(api.url)
    assert docker("inspect", "-f", "{{.State.StartedAt}}", api.name).stdout == api_started


def test_a_runner_container_stopped_with_docker_stop_finishes_the_answers_in_flight(topology):
    """`docker stop` (SIGTERM to the image's entrypoint, which execs `bentoml serve`): the
    runner drains, so a stream in flight ends with its finish reason, not an error."""
    api, runner = topology
    outcome = Outcome()
    thread = _start(_stream, api.url, 160, outcome)
    assert outcome.first_token.wait(60) and outcome.error is None
    started = time.monotonic()
    docker("stop", "-t", "120", runner.name, timeout=180)
    FIGURES["runner container: docker stop with a stream in flight (s)"] = round(
        time.monotonic() - started, 1
    )
    thread.join(30)
    assert outcome.status == 200 and outcome.error is None
    assert outcome.events[-1][1] == "[DONE]"
    last = json.loads(outcome.events[-2][1])
    assert "error" not in last and last["choices"][0]["finish_reason"] in {"stop", "length"}
    assert docker("inspect", "-f", "{{.State.ExitCode}}", runner.name).stdout.strip() == "0"

    away = httpx.post(
        f"{api.url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 8}, timeout=30
    )
    assert away.status_code == 503 and away.headers["retry-after"]
    docker("start", runner.name)
    runner.ready()
    api.ready(timeout=60)
    assert "Paris" in _ask(api.url)


# ---------------------------------------------------------------- all-in-one


def test_the_llamacpp_runner_image_serves_the_gguf_behind_the_api_image(images, run_container):
    """The runner's image on llama.cpp (no torch, the wheel built here, Debian's libgomp1):
    the GGUF of the store entry, answered through the unchanged API image, structured output
    included."""
    runner = run_container(
        "llm-test-runner-llamacpp", images.runner_llamacpp(), alias="llm-runner-llamacpp"
    )
    FIGURES["llama.cpp runner container: docker run to /readyz (s)"] = round(runner.ready(), 1)
    api = run_container(
        "llm-test-api-llamacpp", images.api(),
        env={"LLM_RUNNER_URL": "http://llm-runner-llamacpp:3000"},
    )  # fmt: skip
    api.ready("/readyz")
    assert "Paris" in _ask(api.url) and "Paris" in _ask_streamed(api.url)
    client = OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=120)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    answer = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=QUESTION, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )  # fmt: skip
    assert isinstance(json.loads(answer.choices[0].message.content)["city"], str)
    metrics = scrape(runner.url)
    assert metrics[("llm_runner_engine_info", (("engine", "llamacpp"),))] == 1
    found = docker(
        "run", "--rm", "--entrypoint", "python", images.runner_llamacpp(), "-c",
        "import llama_cpp, importlib.util as u;"
        " print([m for m in ('vllm', 'triton', 'torch') if u.find_spec(m)])",
    )  # fmt: skip
    assert found.stdout.strip() == "[]"  # no torch, no triton (glue/image.py)
    weights = docker(
        "run", "--rm", "--entrypoint", "python", images.runner_llamacpp(), "-c",
        "import glob; print(sorted(p.rsplit('/', 1)[1] for p in"
        " glob.glob('/home/bentoml/bento/models/**/*.*', recursive=True)))",
    ).stdout  # fmt: skip
    assert ".gguf" in weights and ".safetensors" not in weights  # the GGUF entry, alone


def test_the_all_in_one_image_serves_api_and_runner_in_one_container(images: Images, run_container):
    image = images.all_in_one()
    started = time.monotonic()
    both = run_container("llm-test-all-in-one", image, env={"LLM_DEVICE": "cpu"})
    both.ready()
    FIGURES["all-in-one container: docker run to /readyz (s)"] = round(
        time.monotonic() - started, 1
    )
    assert "Paris" in _ask(both.url)
    assert "Paris" in _ask_streamed(both.url)
    # Its own runner's series are on its /metrics (a runner beside the API is counted there).
    assert ("llm_runner_requests_running", ()) in scrape(both.url)


# ---------------------------------------------------------------- compose


COMPOSE_FILES = ["-f", "deploy/compose.yaml"]


def _compose(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(
        [COMPOSE, *COMPOSE_FILES, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.skipif(COMPOSE is None, reason="no docker-compose (apt-get install docker-compose)")
@pytest.mark.parametrize("hardware", ["gpu", "cpu"])
def test_compose_files_are_valid_for_docker_compose(hardware):
    result = _compose("-f", f"deploy/compose.{hardware}.yaml", "config")
    assert result.returncode == 0, result.stderr
    assert ("driver: nvidia" in result.stdout) == (hardware == "gpu")


@pytest.mark.skipif(COMPOSE is None, reason="no docker-compose (apt-get install docker-compose)")
def test_compose_brings_the_topology_up_on_cpu(images: Images):
    env = {
        "LLM_RUNNER_IMAGE": images.runner(),
        "LLM_API_IMAGE": images.api(),
        "LLM_API_PORT": str(port := free_port()),
    }
    project = ["-f", "deploy/compose.cpu.yaml", "-p", "llm-bundle-test"]
    _compose(*project, "down", "-v", env=env)
    try:
        up = _compose(*project, "up", "-d", env=env, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        url = f"http://127.0.0.1:{port}"
        api_id = _compose(*project, "ps", "-q", "api", env=env).stdout.strip()  # v1 or v2 names
        Container(api_id, url).ready(timeout=300)
        assert "Paris" in _ask(url)
        assert "Paris" in _ask_streamed(url)
    finally:
        logs = _compose(*project, "logs", "--tail", "40", env=env).stdout
        down = _compose(*project, "down", "-v", "--timeout", "5", env=env)
        assert down.returncode == 0, down.stderr + logs
