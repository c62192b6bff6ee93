"""Deadlines on a token stream: the whole generation, and the wait for each next piece.

When one passes, the stream is closed (which cancels the generation in the runner) and the
client gets a 504, or an error event when its stream has already started.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from logic.errors import GenerationTimeoutError

T = TypeVar("T")


async def within_deadlines(
    stream: AsyncIterator[T], *, total: float | None, idle: float | None
) -> AsyncIterator[T]:
    """``stream``'s items until it ends; :class:`GenerationTimeoutError` once ``total`` seconds
    have passed since the first call, or ``idle`` seconds without an item (queueing for a
    batch slot included). Either way ``stream`` is closed before the error is raised.

    Each wait is an ``asyncio.timeout`` in the caller's own task: a timer armed and disarmed
    per item. ``asyncio.wait_for`` would run every item's wait in a task of its own (a task
    made, scheduled and awaited per token, a third of this function's cost per token)."""
    loop = asyncio.get_running_loop()
    deadline = None if total is None else loop.time() + total
    async with contextlib.aclosing(stream):
        while True:
            now = loop.time()
            wake, which = (None if idle is None else now + idle), "idle"
            if deadline is not None and (wake is None or deadline < wake):
                wake, which = deadline, "total"
            try:
                async with asyncio.timeout_at(wake) as timer:
                    item = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if not timer.expired():  # the stream's own, not a deadline's
                    raise
                limit = idle if which == "idle" else total
                raise GenerationTimeoutError(which, limit) from None
            yield item
