"""Faults on a real `bentoml serve` with the real model: the runner killed mid-answer, and
SIGTERM with requests in flight. Each test starts its own server (they break it)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from contract.settings import DEFAULT_MODEL
from tests.conftest import USER_BENTOML_HOME
from tests.e2e.test_serve import default_model_in_store
from tests.served import BENTOML, ServedProcess, free_port, scrape

LONG = [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]


def _serve(service: str, *extra: str) -> ServedProcess:
    if not default_model_in_store():
        pytest.skip(f"{DEFAULT_MODEL} is not in {USER_BENTOML_HOME}: run `make model`")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update(BENTOML_HOME=USER_BENTOML_HOME, BENTOML_DO_NOT_TRACK="true")
    return ServedProcess(
        [BENTOML, "serve", f"service:{service}", *extra], port=free_port(), env=env
    )


class Outcome:
    """What one client saw, with the time of each event (``time.monotonic``)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.error: str | None = None
        self.first_token = threading.Event()
        self.sent_at = time.monotonic()
        self.ended_at: float | None = None

    def timeline(self) -> str:
        first = f"{self.events[0][0] - self.sent_at:.1f}s" if self.events else "never"
        end = f"{self.ended_at - self.sent_at:.1f}s" if self.ended_at is not None else "not yet"
        return f"{len(self.events)} events, the first after {first}, ended after {end}"


# How long a client waits for the first token (and then for each next event). Minutes, not
# seconds: these tests are about what happens after a fault, and CI once saw a restarted vLLM
# runner take over 60 s for its first token on a loaded 2-core host (the server's log now
# comes with a failure, see tests/served.py).
FIRST_TOKEN_SECONDS = 150


def _stream(url: str, max_tokens: int, outcome: Outcome) -> None:
    body = {"messages": LONG, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, timeout=FIRST_TOKEN_SECONDS
        ) as resp:
            outcome.status = resp.status_code
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    outcome.events.append((time.monotonic(), line.removeprefix("data: ")))
                    if '"content":"' in line and '"content":""' not in line:
                        outcome.first_token.set()
    except httpx.HTTPError as exc:
        outcome.error = repr(exc)
    outcome.ended_at = time.monotonic()
    outcome.first_token.set()


def _whole(url: str, max_tokens: int, outcome: Outcome) -> None:
    body = {"messages": LONG, "max_tokens": max_tokens, "temperature": 0}
    try:
        # No byte comes back before the answer ends, and setting up the kill can take minutes
        # on a loaded machine: the client must not give up first (its own timeout, not the
        # server's answer, is what this would then see).
        resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        outcome.status, outcome.headers = resp.status_code, dict(resp.headers)
        outcome.events.append((time.monotonic(), resp.text))
    except httpx.HTTPError as exc:
        outcome.error = repr(exc)
    outcome.ended_at = time.monotonic()


def _start(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def split() -> Iterator[ServedProcess]:
    with _serve("ChatAPI") as served:
        yield served


def runner_process(served: ServedProcess) -> psutil.Process:
    """The runner worker of a `bentoml serve` of the split topology."""
    (runner,) = [
        p for p in served.process.children(recursive=True)
        if "--service-name LLMRunner" in " ".join(p.cmdline())
    ]  # fmt: skip
    return runner


def start_in_flight(served: ServedProcess, streams: int, max_tokens: int = 1000):
    """``streams`` streamed answers (each past its first token) and one whole one, running."""
    url = served.url
    outcomes = [Outcome() for _ in range(streams)]
    whole = Outcome()
    threads = [_start(_stream, url, max_tokens, o) for o in outcomes]
    threads.append(_start(_whole, url, max_tokens, whole))
    started = time.monotonic()
    for outcome in outcomes:
        if not outcome.first_token.wait(FIRST_TOKEN_SECONDS):
            what = f"no first token in {time.monotonic() - started:.0f} s"
            _stuck(served, what, [*outcomes, whole])
        assert outcome.error is None, _seen(outcome)
    # The whole answer has no first token to wait for: wait until the runner holds it too
    # (the API's page carries the runner's gauges). On a busy machine it can reach the runner
    # after the streams' first tokens; sent after a kill, it would wait in the socket that
    # `bentoml serve` keeps open for the next runner, not be one of the requests in flight.
    deadline = time.monotonic() + 90
    looks: list[str] = []  # the runner's gauges when they change or are slow to come
    last = None
    while True:
        at = time.monotonic()
        held, done = _runner_view(url)
        took = time.monotonic() - at
        if (held, done) != last or took > 1:
            looks.append(f"at {at - started:.1f}s {held:g} held, {done} (read in {took:.2f}s)")
            last = held, done
        ended = [o for o in (*outcomes, whole) if o.ended_at is not None]
        if ended:  # CI saw this on vLLM, one request trailing the others: show why
            what = f"a request ended before the kill, the runner's looks: {looks}"
            _stuck(served, what, [*outcomes, whole])
        if held >= streams + 1:
            return threads, outcomes, whole
        if time.monotonic() > deadline:
            what = f"the runner held {held} of {streams + 1} requests: {looks}"
            _stuck(served, what, [*outcomes, whole])
        time.sleep(0.2)  # each look is a /metrics of the API and of the runner


def _stuck(served: ServedProcess, what: str, outcomes: list[Outcome]) -> None:
    """Fail with what the clients saw and the server's log, its workers' stacks at the end."""
    served.dump_stacks()
    seen = "\n".join(f"{o.timeline()}: {_seen(o)}" for o in outcomes)
    raise AssertionError(f"{what}:\n{seen}\n--- the server's log:\n{served.log(12000)}")


def _seen(outcome: Outcome) -> str:
    last = outcome.events[-1][1][:300] if outcome.events else None
    return f"status {outcome.status}, error {outcome.error}, last {last!r}"


def _runner_view(url: str) -> tuple[float, str]:
    """The requests the runner holds, and what became of those it no longer holds."""
    metrics = scrape(url)
    held = sum(metrics[(f"llm_runner_requests_{s}", ())] for s in ("running", "waiting"))
    done = ", ".join(
        f"{metrics[(f'llm_runner_requests_{s}_total', ())]:g} {s}"
        for s in ("finished", "cancelled", "refused")
    )
    return held, done


def assert_failed_fast(threads, streams, whole, since: float, within: float = 5) -> None:
    """Each stream got a runner_unavailable error event and [DONE], the whole request a 503
    with Retry-After, all within ``within`` seconds of ``since``; nothing hung."""
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), (
            f"a request hung after the runner died: {[_seen(o) for o in (*streams, whole)]}"
        )
    for outcome in streams:  # an error event, then the end of the stream, within seconds
        assert outcome.status == 200 and outcome.error is None, _seen(outcome)
        at, last_data = outcome.events[-2]
        assert json.loads(last_data)["error"]["code"] == "runner_unavailable"
        assert outcome.events[-1][1] == "[DONE]"
        assert at - since < within
    assert whole.status == 503 and whole.headers["retry-after"], _seen(whole)
    assert json.loads(whole.events[-1][1])["error"]["code"] == "runner_unavailable"
    assert whole.ended_at - since < within


def test_a_runner_killed_mid_answer_fails_its_requests_fast_and_the_api_recovers(split):
    url = split.url
    threads, streams, whole = start_in_flight(split, 2)
    runner = runner_process(split)
    killed = time.monotonic()
    runner.send_signal(signal.SIGKILL)
    assert_failed_fast(threads, streams, whole, killed)

    # The API process stayed up; /readyz is false until `bentoml serve` restarted the runner.
    assert httpx.get(f"{url}/livez", timeout=5).status_code == 200
    saw_unready, deadline = False, time.monotonic() + 120
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/readyz", timeout=5).status_code
        saw_unready |= status == 503
        if status == 200 and saw_unready:
            break
        time.sleep(0.2)
    assert saw_unready, "/readyz never reported the runner away"
    answer = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "What is the capital of France?"}],
              "max_tokens": 16, "temperature": 0},
        timeout=60,
    )  # fmt: skip
    assert answer.status_code == 200 and "Paris" in answer.text


def _exit_within(served: ServedProcess, seconds: float) -> float:
    start = time.monotonic()
    assert served.proc is not None
    served.proc.wait(timeout=seconds)
    return time.monotonic() - start


# The grace period of the drain tests: long enough for their two 90-token answers on a loaded
# machine. With 30 s, a C++ compile beside them cut a stream at 30 s (the client read "peer
# closed connection without sending complete message body"): the answer outlived the grace
# period, which ends it by design (test_past_the_grace_period_the_server_exits_anyway).
DRAIN_GRACE = 120


@pytest.mark.parametrize("service", ["ChatAPI", "Monolith"])
def test_sigterm_stops_accepting_finishes_what_is_in_flight_then_exits(service):
    with _serve(service, "--timeout-graceful-shutdown", str(DRAIN_GRACE)) as served:
        stream, whole = Outcome(), Outcome()
        threads = [_start(_stream, served.url, 90, stream), _start(_whole, served.url, 90, whole)]
        assert stream.first_token.wait(60)
        workers = served.process.children(recursive=True)
        os.kill(served.proc.pid, signal.SIGTERM)  # what Kubernetes sends the container
        time.sleep(1.0)
        with pytest.raises(httpx.TransportError):  # the listening socket is closed
            httpx.post(f"{served.url}/v1/models", timeout=5)
        for thread in threads:
            thread.join(DRAIN_GRACE)
        finished = [json.loads(data) for _, data in stream.events[:-1]]
        assert stream.error is None and stream.events[-1][1] == "[DONE]"
        assert finished[-1]["choices"][0]["finish_reason"] == "length"
        assert whole.status == 200
        assert json.loads(whole.events[-1][1])["usage"]["completion_tokens"] == 90
        _exit_within(served, DRAIN_GRACE)
        assert served.proc.returncode == 0
        _, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive  # every worker exited with it


def test_past_the_grace_period_the_server_exits_anyway():
    with _serve("ChatAPI", "--timeout-graceful-shutdown", "3") as served:
        stream = Outcome()
        thread = _start(_stream, served.url, 4000, stream)
        assert stream.first_token.wait(60)
        os.kill(served.proc.pid, signal.SIGTERM)
        took = _exit_within(served, 30)
        thread.join(30)
        assert not thread.is_alive() and stream.ended_at is not None  # the client is let go
        assert took < 3 + 15
        assert not any(e[1] == "[DONE]" for e in stream.events)  # cut, not finished
