"""Load, soak and fuzzing against a real `bentoml serve` (split topology, tiny model), on
loopback only. Every client has a deadline, so nothing here can hang: a request that
outlives it is counted as hung, and the tests require zero.

`make test-load` runs this folder (CI runs it after `make test`).
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.load.conftest import service_processes
from tests.served import ServedProcess, scrape

CHAT_ROUTE = "/v1/chat/completions"
HUNG_AFTER = 120.0  # seconds: far beyond any answer of the tiny model, even under load


def _chat(i: int, max_tokens: int = 16, stream: bool = True) -> dict:
    content = f"Request {i}: tell me something."
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": stream}  # fmt: skip


def _check_stream(text: str) -> None:
    """A whole stream: chunks, one finish reason, no error event, then [DONE]."""
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not [c for c in chunks if "error" in c]
    reasons = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert len(reasons) == 1 and reasons[0] in {"stop", "length"}


async def _one(client: httpx.AsyncClient, body: dict) -> tuple[str, httpx.Response | None]:
    """("ok" | "busy" | "other" | "hung", response)."""
    try:
        response = await asyncio.wait_for(client.post(CHAT_ROUTE, json=body), HUNG_AFTER)
    except asyncio.TimeoutError:
        return "hung", None
    if response.status_code == 200:
        if body.get("stream"):
            _check_stream(response.text)
        return "ok", response
    if response.status_code == 429:
        error = response.json()["error"]
        assert error["code"] == "model_at_capacity" and error["type"] == "rate_limit_error"
        assert int(response.headers["retry-after"]) >= 1
        return "busy", response
    return "other", response


def _client(server: ServedProcess) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    return httpx.AsyncClient(base_url=server.url, limits=limits, timeout=HUNG_AFTER + 10)


async def _settled(server: ServedProcess) -> dict:
    """The metrics once nothing is in flight any more (the last streams are closing)."""
    for _ in range(50):
        metrics = scrape(server.url)
        busy = (
            metrics[("llm_api_requests_in_flight", ())]
            + metrics[("llm_runner_requests_in_flight", ())]
        )
        if busy == 0:
            return metrics
        await asyncio.sleep(0.1)
    raise AssertionError(f"requests still in flight after the load: {busy}")


def _delta(after: dict, before: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_200_concurrent_streams_are_each_answered_or_refused_never_lost(tiny_server):
    """More streams than the runner holds (32): each one either streams to its end or gets
    an immediate 429 with Retry-After; none hangs, none fails otherwise, and the server's
    own counters account for every one."""

    async def run():
        before = scrape(tiny_server.url)
        async with _client(tiny_server) as client:
            started = time.monotonic()
            results = await asyncio.gather(*[_one(client, _chat(i)) for i in range(200)])
            took = time.monotonic() - started
        return before, await _settled(tiny_server), [kind for kind, _ in results], took

    before, after, kinds, took = asyncio.run(run())
    counts = Counter(kinds)
    print(f"200 concurrent streams: {dict(counts)} in {took:.1f} s")
    assert counts["hung"] == 0 and counts["other"] == 0
    assert counts["ok"] + counts["busy"] == 200
    assert counts["ok"] >= 32  # at least a full runner's worth streamed at once
    # Every answer and every refusal is on the server's books, once.
    assert (
        _delta(after, before, "llm_api_requests_total", route=CHAT_ROUTE, status="200")
        == (counts["ok"])
    )
    assert (
        _delta(after, before, "llm_api_requests_total", route=CHAT_ROUTE, status="429")
        == (counts["busy"])
    )
    # The refusals came from the runner's in-flight limit (the API's own is far higher).
    assert _delta(after, before, "llm_runner_requests_refused_total") == counts["busy"]
    assert (
        _delta(after, before, "llm_api_errors_total", code="model_at_capacity") == (counts["busy"])
    )


def test_200_clients_that_honour_retry_after_all_get_their_answer(tiny_server):
    """The same burst, with clients that wait as told and retry: zero lost."""

    async def patient(client: httpx.AsyncClient, i: int, deadline: float) -> tuple[str, int]:
        tries = 0
        while time.monotonic() < deadline:
            tries += 1
            kind, response = await _one(client, _chat(i))
            if kind == "other":
                others.append(f"{response.status_code} {response.text[:300]}")
            if kind != "busy":
                return kind, tries
            wait = float(response.headers["retry-after"])
            await asyncio.sleep(wait * random.uniform(0.2, 1.0))  # jitter spreads the retries
        return "hung", tries

    others: list[str] = []

    async def run():
        deadline = time.monotonic() + 240
        async with _client(tiny_server) as client:
            return await asyncio.gather(*[patient(client, i, deadline) for i in range(200)])

    results = asyncio.run(run())
    kinds = Counter(kind for kind, _ in results)
    print(f"200 patient clients: {dict(kinds)}, tries {sum(t for _, t in results)}")
    assert kinds == {"ok": 200}, others


def _rss(server: ServedProcess) -> dict[str, int]:
    return {name: p.memory_info().rss for name, p in service_processes(server.process).items()}


SOAK_REQUESTS = 5000
SOAK_WARMUP = 500
SOAK_CLIENTS = 16  # below the runner's 32 in flight: no request should be refused


def test_a_soak_of_5000_requests_leaves_every_process_within_10_percent_of_its_memory(
    tiny_server,
):
    """Whole and streamed chats, text completions, and bad requests, from 16 clients. Memory
    is measured after a warm-up (caches, allocator pools, first-use imports) and at the end."""
    rng = random.Random(7)
    plan = [rng.randrange(10) for _ in range(SOAK_REQUESTS)]
    statuses: Counter = Counter()
    memory: dict[str, dict[str, int]] = {}

    async def send(client: httpx.AsyncClient, i: int, kind: int) -> None:
        max_tokens = 1 + i % 16
        if kind < 6:
            path, body = CHAT_ROUTE, _chat(i, max_tokens, stream=False)
        elif kind < 8:
            path, body = CHAT_ROUTE, _chat(i, max_tokens, stream=True)
        elif kind == 8:
            path, body = "/v1/completions", {"prompt": f"Number {i} is", "max_tokens": max_tokens}
        else:
            path, body = CHAT_ROUTE, {"messages": [], "max_tokens": max_tokens}  # a 400
        response = await asyncio.wait_for(client.post(path, json=body), HUNG_AFTER)
        statuses[(kind == 9, response.status_code)] += 1
        if response.status_code == 200 and body.get("stream"):
            _check_stream(response.text)

    async def run() -> float:
        queue: asyncio.Queue = asyncio.Queue()
        for item in enumerate(plan):
            queue.put_nowait(item)

        async def worker(client: httpx.AsyncClient) -> None:
            while not queue.empty():
                i, kind = queue.get_nowait()
                if i == SOAK_WARMUP:
                    memory["warm"] = _rss(tiny_server)
                await send(client, i, kind)

        started = time.monotonic()
        async with _client(tiny_server) as client:
            await asyncio.gather(*[worker(client) for _ in range(SOAK_CLIENTS)])
        return time.monotonic() - started

    took = asyncio.run(run())
    memory["end"] = _rss(tiny_server)
    print(f"soak: {SOAK_REQUESTS} requests in {took:.0f} s; statuses {dict(statuses)}")
    for name, warm in memory["warm"].items():
        end = memory["end"][name]
        print(f"  {name}: {warm / 2**20:.0f} MiB after warm-up, {end / 2**20:.0f} MiB at the end")
    bad_requests = sum(1 for kind in plan if kind == 9)
    assert statuses == {(False, 200): SOAK_REQUESTS - bad_requests, (True, 400): bad_requests}
    assert set(memory["end"]) == set(memory["warm"]) == {"ChatAPI:1", "ChatAPI:2", "LLMRunner:1"}
    for name, warm in memory["warm"].items():
        assert memory["end"][name] < 1.10 * warm, f"{name} grew past 10%"


SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


@pytest.mark.parametrize(
    ("spec", "checks"),
    [
        # Our OpenAI-compatible routes: no 5xx, and every answer matches the spec we publish.
        ("/v1/openapi.json", "not_a_server_error,status_code_conformance,"
         "content_type_conformance,response_schema_conformance"),
        # BentoML's spec of the native endpoints and health routes: no 5xx.
        ("/docs.json", "not_a_server_error"),
    ],
)  # fmt: skip
def test_schemathesis_finds_no_server_error(tiny_server, spec, checks, tmp_path):
    command = [
        SCHEMATHESIS, "run", f"{tiny_server.url}{spec}", "--checks", checks,
        "--max-examples", "100", "--seed", "20261121", "--request-timeout", "60",
        "--generation-database", "none", "--no-color",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    print(run.stdout[-1500:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Test cases:" in run.stdout  # it did generate and send requests
