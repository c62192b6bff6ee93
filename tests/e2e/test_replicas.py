"""Several runner replicas behind one API, on real processes with the default model: each
runner a `start-http-server --service-name LLMRunner` with one torch thread (two on two cores
slow each other about 20x), the API a `start-http-server` pointed at them by LLM_RUNNER_URL.

The two runners listen on one port at two loopback addresses (127.0.0.1 and 127.0.0.2), as
two pods of one headless Service would: the list form names both, the DNS form gives one host
name with both addresses (an /etc/hosts entry, where this machine lets the test write one).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from contract.settings import DEFAULT_MODEL
from tests.conftest import USER_BENTOML_HOME
from tests.e2e.test_serve import default_model_in_store
from tests.served import START_HTTP_SERVER, ServedProcess, free_port, own_home, scrape

HOSTS = ("127.0.0.1", "127.0.0.2")
HOSTS_FILE = Path("/etc/hosts")
DNS_NAME = "llm-runners.replicas-test.internal"


def _env(**extra: str) -> dict[str, str]:
    """Each server a BENTOML_HOME of its own over the one model store (tests/served.py says
    why: its metrics would be wiped by the next server's start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    home = own_home(USER_BENTOML_HOME, Path(tempfile.gettempdir()))
    env.update(BENTOML_HOME=home, BENTOML_DO_NOT_TRACK="true", **extra)
    return env


def _runner(host: str, port: int) -> ServedProcess:
    command = [*START_HTTP_SERVER, "service:ChatAPI", "--service-name", "LLMRunner"]
    return ServedProcess(
        command, port=port, host=host, env=_env(LLM_TORCH_THREADS="1"), start_timeout=300
    )


def _api(runner_url: str) -> ServedProcess:
    env = _env(
        LLM_RUNNER_URL=runner_url, LLM_RUNNER_PROBE_INTERVAL="0.5", LLM_RUNNER_DNS_REFRESH="1"
    )
    return ServedProcess([*START_HTTP_SERVER, "service:ChatAPI"], port=free_port(), env=env)


@dataclass
class Cluster:
    api: ServedProcess
    runners: dict[str, ServedProcess] = field(default_factory=dict)  # replica URL -> process
    port: int = 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not default_model_in_store():
        pytest.skip(f"{DEFAULT_MODEL} is not in {USER_BENTOML_HOME}: run `make model`")
    port = free_port()
    runners = {f"http://{host}:{port}": _runner(host, port) for host in HOSTS}
    cluster = Cluster(_api(",".join(runners)), runners, port)
    try:
        for runner in runners.values():  # both load the model at once
            runner.launch()
        for runner in runners.values():
            runner.wait_ready()
        cluster.api.start()
        yield cluster
    finally:  # what is there at the end: a test may have replaced a runner
        for served in [cluster.api, *cluster.runners.values()]:
            served.close()


def chat(url: str, messages: list[dict], max_tokens: int = 16, timeout: float = 300) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()


def cached(answer: dict) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def series(url: str, name: str) -> dict[dict, float]:
    """``name``'s samples on ``url``'s /metrics, keyed by their labels (sorted pairs)."""
    return {labels: value for (sample, labels), value in scrape(url).items() if sample == name}


def routed(url: str) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["replica"], dict(labels)["reason"]): value
        for labels, value in series(url, "llm_api_runner_routed_total").items()
    }


def routed_to(url: str, messages: list[dict], max_tokens: int) -> tuple[str, str, dict]:
    """Where the API routed one chat request (sent alone), and why, and its answer."""
    before = routed(url)
    answer = chat(url, messages, max_tokens)
    after = routed(url)
    (key,) = [k for k, v in after.items() if v > before.get(k, 0)]
    return key[0], key[1], answer


def block_size(cluster: Cluster) -> int:
    runner = next(iter(cluster.runners.values()))
    return int(series(runner.url, "llm_runner_kv_cache_block_tokens")[()])


def test_a_conversation_s_later_turns_go_to_the_replica_that_holds_its_earlier_turns(cluster):
    url, block = cluster.api.url, block_size(cluster)
    used = set()
    for i, topic in enumerate(["sailing", "baking bread", "chess openings", "growing tomatoes"]):
        system = f"You are Guide {i}, a patient expert on {topic}. Answer briefly and kindly. " * 2
        question = f"What should a beginner know about {topic}?"
        turn = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        first_replica, _, first = routed_to(url, turn, 24)
        turn += [first["choices"][0]["message"],
                 {"role": "user", "content": "And what is the most common mistake?"}]  # fmt: skip
        second_replica, reason, second = routed_to(url, turn, 8)
        used.add(first_replica)
        # prefix: this API worker sent the first turn there; hash: the other worker, which
        # never saw it, placed it by the same rendezvous hash as the first turn's worker did.
        assert second_replica == first_replica and reason in ("prefix", "hash"), (i, reason)
        # The runner's own count: the whole first turn (its full blocks) was found cached.
        assert cached(second) >= first["usage"]["prompt_tokens"] // block * block, second["usage"]
    assert used <= set(cluster.runners)


def test_a_shared_system_prompt_is_computed_once_per_replica_not_per_request(cluster):
    url, block = cluster.api.url, block_size(cluster)
    shared = (
        "You are the support assistant of Northwind Outfitters, a shop for hiking and camping "
        "gear. Be friendly and brief. Never promise delivery dates. Refunds take five working "
        "days. Our stores open at nine and close at six, Monday to Saturday. "
    ) * 3
    questions = ["Do you sell tents?", "When do you open?", "How long do refunds take?",
                 "Can I return boots?", "Do you ship abroad?", "Is there a sale?"]  # fmt: skip
    answers = [
        chat(url, [{"role": "system", "content": shared}, {"role": "user", "content": q}], 4)
        for q in questions
    ]
    # The shared prompt's full blocks, as the shortest of these prompts holds them.
    shared_tokens = min(a["usage"]["prompt_tokens"] for a in answers) - 16
    computed = [a["usage"] for a in answers if cached(a) < shared_tokens // block * block]
    assert 1 <= len(computed) <= len(cluster.runners), computed


@dataclass
class Outcome:
    status: int | None = None
    events: list[str] = field(default_factory=list)
    error: str | None = None
    first_token: threading.Event = field(default_factory=threading.Event)


def _stream(url: str, topic: str, outcome: Outcome) -> None:
    messages = [{"role": "system", "content": f"You are a storyteller who loves {topic}."},
                {"role": "user", "content": f"Tell a very long story about {topic}."}]  # fmt: skip
    body = {"messages": messages, "max_tokens": 400, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as resp:
            outcome.status = resp.status_code
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    outcome.events.append(line.removeprefix("data: "))
                    if '"content":"' in line and '"content":""' not in line:
                        outcome.first_token.set()
    except httpx.HTTPError as exc:
        outcome.error = repr(exc)
    outcome.first_token.set()


def _in_flight(url: str) -> dict[str, float]:
    return {
        dict(labels)["replica"]: value
        for labels, value in series(url, "llm_api_runner_in_flight").items()
    }


def _up(url: str, replica: str) -> float | None:
    return series(url, "llm_api_runner_up").get((("replica", replica),))


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_replica_killed_under_load_loses_no_unstarted_request_and_is_used_again(cluster):
    url = cluster.api.url
    streams = {topic: Outcome() for topic in ["dragons", "pirates", "robots", "wizards"]}
    threads = [threading.Thread(target=_stream, args=(url, t, o), daemon=True)
               for t, o in streams.items()]  # fmt: skip
    for thread in threads:
        thread.start()
    for outcome in streams.values():
        assert outcome.first_token.wait(120) and outcome.error is None, outcome
    in_flight = _in_flight(url)
    victim = max(cluster.runners, key=lambda r: in_flight.get(r, 0))
    on_victim = int(in_flight[victim])
    cluster.runners[victim].kill()

    # New requests right after the kill: those the router still sends to the dead replica
    # fail before any token and are sent to the live one; none is lost.
    fresh: list[dict] = []
    senders = [
        threading.Thread(
            target=lambda q=q: fresh.append(chat(url, [{"role": "user", "content": q}], 8)),
            daemon=True,
        )
        for q in ["Name a color.", "Name a fruit.", "Name a planet.", "Name a tree."]
    ]
    for sender in senders:
        sender.start()
    for thread in [*senders, *threads]:
        thread.join(300)
        assert not thread.is_alive(), "a request hung after a replica died"
    assert len(fresh) == len(senders), "a request sent after the kill was lost"

    cut = []
    for topic, outcome in streams.items():  # every stream ended cleanly: finished, or cut
        assert outcome.status == 200 and outcome.error is None, (topic, outcome)
        assert outcome.events[-1] == "[DONE]", (topic, outcome.events[-3:])
        last = json.loads(outcome.events[-2])
        if "error" in last:
            assert last["error"]["code"] == "runner_unavailable", last
            cut.append(topic)
        else:
            assert last["choices"][0]["finish_reason"] == "length", last
    assert len(cut) == on_victim, (cut, in_flight)
    outcomes = series(url, "llm_api_runner_requests_total")
    assert outcomes[(("outcome", "failed_mid_stream"), ("replica", victim))] == on_victim
    _wait(lambda: _up(url, victim) == 0, 10, "the dead replica stayed in the rotation")
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200  # one replica is up

    # Restarted, it rejoins the rotation and serves again.
    host = victim.removeprefix("http://").rsplit(":", 1)[0]
    cluster.runners[victim].close()
    cluster.runners[victim] = _runner(host, cluster.port).start()
    _wait(lambda: _up(url, victim) == 1, 30, "the restarted replica did not rejoin")
    for i in range(16):
        messages = [{"role": "system", "content": f"You are helper number {i}."},
                    {"role": "user", "content": "Say hello."}]  # fmt: skip
        replica, _, _ = routed_to(url, messages, 4)
        if replica == victim:
            break
    else:
        pytest.fail(f"16 new conversations and none went to the restarted {victim}")


@contextmanager
def _hosts_entry(name: str, addresses: tuple[str, ...]) -> Iterator[None]:
    original = HOSTS_FILE.read_text()
    lines = "".join(f"{address} {name}\n" for address in addresses)
    HOSTS_FILE.write_text(original + ("" if original.endswith("\n") else "\n") + lines)
    try:
        yield
    finally:
        HOSTS_FILE.write_text(original)


def test_a_host_name_with_several_addresses_is_one_replica_per_address(cluster):
    if not os.access(HOSTS_FILE, os.W_OK):
        pytest.skip(f"cannot write {HOSTS_FILE} here to give a name two addresses "
                    "(tests/unit/test_router.py covers the resolver)")  # fmt: skip
    with _hosts_entry(DNS_NAME, HOSTS), _api(f"http://{DNS_NAME}:{cluster.port}") as api:

        def known() -> set[str]:
            return {dict(labels)["replica"] for labels in series(api.url, "llm_api_runner_up")}

        _wait(lambda: known() >= set(cluster.runners), 15, "the addresses did not become replicas")
        replicas = set()
        for i in range(12):
            messages = [{"role": "system", "content": f"You are assistant {i} of many."},
                        {"role": "user", "content": "Say yes."}]  # fmt: skip
            replica, _, _ = routed_to(api.url, messages, 2)
            replicas.add(replica)
        assert replicas == set(cluster.runners)


def test_one_runner_url_is_the_single_runner_path(cluster):
    only = next(iter(cluster.runners))
    with _api(only) as api:
        answer = chat(api.url, [{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in answer["choices"][0]["message"]["content"]
        assert routed(api.url) == {}  # no routing: every request to the one runner


def test_with_no_replica_up_the_api_is_not_ready_and_answers_503():
    dead = f"http://127.0.0.1:{free_port()},http://127.0.0.1:{free_port()}"
    api = _api(dead)
    api.launch()
    try:
        # Never ready (no replica answers); it still serves, with the runner_unavailable 503.
        deadline = time.monotonic() + 120
        while True:
            assert api.proc.poll() is None, api.log()
            try:
                status = httpx.get(f"{api.url}/readyz", timeout=2).status_code
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, api.log()
                time.sleep(0.5)
        assert status == 503
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        response = httpx.post(f"{api.url}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "runner_unavailable"
        assert response.headers["retry-after"]
    finally:
        api.close()
