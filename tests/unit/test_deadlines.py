"""Deadlines on a token stream: they fire on time, and they close the stream they guard."""

from __future__ import annotations

import asyncio
import time

import pytest

from logic.deadlines import within_deadlines
from logic.errors import GenerationTimeoutError


class Source:
    """Yields ``count`` items ``every`` seconds apart, then stalls forever; records closing."""

    def __init__(self, every: float, count: int = 10**6):
        self.every, self.count = every, count
        self.closed = False

    async def stream(self):
        try:
            for i in range(self.count):
                yield i
                await asyncio.sleep(self.every)
            await asyncio.Event().wait()  # a runner that went quiet
        finally:
            self.closed = True


async def drain(source: Source, **deadlines) -> tuple[list[int], float]:
    items, started = [], time.monotonic()
    async for item in within_deadlines(source.stream(), **deadlines):
        items.append(item)
    return items, time.monotonic() - started


def test_a_quiet_stream_stops_after_the_idle_timeout_and_is_closed():
    source = Source(every=0.01, count=3)
    started = time.monotonic()
    with pytest.raises(GenerationTimeoutError) as raised:
        asyncio.run(drain(source, total=None, idle=0.2))
    # Not before the idle timeout; the upper bound only has to tell "stopped" from "hung" (a
    # loaded machine once took 1.16 s here, event loop start-up included).
    assert 0.2 <= time.monotonic() - started < 3.0
    assert raised.value.status_code == 504 and raised.value.code == "timeout"
    assert "sent nothing" in raised.value.message
    assert source.closed  # the generation is cancelled, not left running


def test_a_steady_stream_stops_at_the_total_timeout_even_if_never_idle():
    source = Source(every=0.02)
    started = time.monotonic()
    with pytest.raises(GenerationTimeoutError) as raised:
        asyncio.run(drain(source, total=0.3, idle=0.2))
    assert 0.3 <= time.monotonic() - started < 1.0
    assert "time limit" in raised.value.message
    assert source.closed


def test_a_stream_within_its_deadlines_passes_through_untouched():
    source = Source(every=0.0, count=5)

    async def finite():
        items = []
        async for item in within_deadlines(_take(source.stream(), 5), total=5, idle=1):
            items.append(item)
        return items

    assert asyncio.run(finite()) == [0, 1, 2, 3, 4]


async def _take(stream, n):
    async for item in stream:
        yield item
        n -= 1
        if n == 0:
            await stream.aclose()
            return
