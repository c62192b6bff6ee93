"""BentoML's request timeout, fixed (glue/request_timeout.py): a 504 when no response starts in
time, nothing of a request left behind once it is over, and a 503 for a request the server
cancels as it stops."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from bentoml._internal.server.http.traffic import TimeoutMiddleware

from glue.request_timeout import fix_request_timeout

fix_request_timeout()


def _app(delay: float, *, fail: bool = False):
    async def app(scope, receive, send):
        await asyncio.sleep(delay)
        if fail:
            raise RuntimeError("handler failed")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(delay)  # a slow body is fine once the response started
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def _call(middleware) -> tuple[list[dict], int]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    await middleware({"type": "http", "method": "GET", "path": "/"}, receive, send)
    pending = len(asyncio.get_running_loop()._scheduled)  # timers still armed
    return sent, pending


def test_a_finished_request_leaves_no_timer_behind():
    sent, pending = asyncio.run(_call(TimeoutMiddleware(_app(0.01), timeout=300)))
    assert sent[0]["status"] == 200 and sent[-1]["body"] == b"ok"
    # BentoML's own version kept a 300 s timer (and the request with it) here.
    assert pending == 0


def test_no_response_within_the_timeout_is_a_504():
    sent, pending = asyncio.run(_call(TimeoutMiddleware(_app(5), timeout=0.2)))
    assert sent[0]["status"] == 504 and pending == 0


def test_a_response_that_started_in_time_may_take_longer():
    sent, _ = asyncio.run(_call(TimeoutMiddleware(_app(0.3), timeout=0.5)))
    assert sent[0]["status"] == 200 and sent[-1]["body"] == b"ok"


def test_a_handler_that_fails_before_responding_fails_now_not_at_the_timeout():
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="handler failed"):
        asyncio.run(_call(TimeoutMiddleware(_app(0.01, fail=True), timeout=300)))
    assert time.monotonic() - started < 5


def test_a_request_the_stopping_server_cancels_before_any_response_gets_a_503():
    """Past its graceful-shutdown period uvicorn cancels the requests still running; one with
    no response yet was a plain-text 500 from the server (seen under load: a whole answer
    that outlived the grace period)."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    async def run():
        middleware = TimeoutMiddleware(_app(30), timeout=300)
        request = asyncio.ensure_future(
            middleware({"type": "http", "method": "POST", "path": "/"}, receive, send)
        )
        await asyncio.sleep(0.05)
        request.cancel()  # what uvicorn does at the end of the grace period
        with pytest.raises(asyncio.CancelledError):
            await request

    asyncio.run(run())
    assert sent[0]["status"] == 503
    assert (b"retry-after", b"1") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "server_shutting_down"
