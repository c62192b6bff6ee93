"""A fix for BentoML's request timeout (``traffic.timeout``), applied to both services.

BentoML 1.4's ``TimeoutMiddleware`` arms a timer for every request and never disarms it: the
timer, and through it the request's whole context (its tracing spans, its state), lives for
``traffic.timeout`` seconds after the request ended. Memory then grows with the request rate
times the timeout (found by the soak test: about 5 KiB a request for 310 s in each API
worker and in the runner). And a request whose handler fails before sending anything waits
out the whole timeout. This replacement keeps the behaviour (a 504 when no response has
started within the timeout) and disarms the timer as soon as the request is over; and a request
the server cancels as it stops (past its graceful-shutdown period) gets a 503 in OpenAI's
shape, not a plain-text 500.

No torch here: the API process imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger(__name__)
# OpenAI's error shape, as the API's own 503s (logic/errors.py).
_STOPPING = JSONResponse(
    {
        "error": {
            "message": "The server is shutting down; retry shortly.",
            "type": "service_unavailable",
            "param": None,
            "code": "server_shutting_down",
        }
    },
    status_code=503,
    headers={"Retry-After": "1"},
)


async def _timeout_call(self: traffic.TimeoutMiddleware, scope: Scope, receive: Receive,
                        send: Send) -> None:  # fmt: skip
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    started = loop.create_future()  # done once the response starts

    async def send_and_mark(message: Message) -> None:
        if not started.done():
            started.set_result(None)
        await send(message)

    handler = asyncio.ensure_future(self.app(scope, receive, send_and_mark))
    timer = loop.call_later(self.timeout, handler.cancel)
    try:
        await asyncio.wait({started, handler}, return_when=asyncio.FIRST_COMPLETED)
        timer.cancel()
        if not started.done():
            with contextlib.suppress(asyncio.CancelledError):
                await handler  # it ended (or was cancelled by the timer) without a response
            if handler.cancelled():
                body = {"error": f"Not able to process the request in {self.timeout} seconds"}
                await JSONResponse(body, status_code=504)(scope, receive, send)
            return
        await handler
    except asyncio.CancelledError:
        # The server stops with this request still running: past its graceful-shutdown period
        # uvicorn cancels what is left. Without a response yet, the client gets a 503 it can
        # retry elsewhere rather than the server's plain-text 500. (A stream already started
        # cannot be told: it is cut.) The handler is stopped first, so only one response starts.
        handler.cancel()
        if not started.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await _STOPPING(scope, receive, send)
        raise
    finally:
        timer.cancel()
        if not handler.done():  # this request was cancelled: so is its handler
            handler.cancel()
        started.cancel()


def fix_request_timeout() -> None:
    """Install the fix once, on the BentoML version it was written for."""
    middleware = traffic.TimeoutMiddleware
    if getattr(middleware, "_llm_bundle_fixed", False):
        return
    if not hasattr(middleware, "_set_timer_out"):  # a BentoML that changed it: leave it be
        logger.warning("BentoML's TimeoutMiddleware changed; its timer fix is not applied")
        return
    middleware.__call__ = _timeout_call
    middleware._llm_bundle_fixed = True
