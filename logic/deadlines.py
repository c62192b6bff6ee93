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
    batch slot included). Either way ``stream`` is closed before the error is raised."""
    loop = asyncio.get_running_loop()
    deadline = None if total is None else loop.time() + total
    async with contextlib.aclosing(stream):
        while True:
            wait, which = idle, "idle"
            if deadline is not None and (wait is None or deadline - loop.time() < wait):
                wait, which = max(deadline - loop.time(), 0.0), "total"
            try:
                item = await asyncio.wait_for(anext(stream), wait)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11
                limit = idle if which == "idle" else total
                raise GenerationTimeoutError(which, limit) from None
            yield item
