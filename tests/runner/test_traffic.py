"""BentoML's request timeout, fixed (glue/request_timeout.py): a 504 when no response starts in
time, and nothing of a request left behind once it is over."""

from __future__ import annotations

import asyncio
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
