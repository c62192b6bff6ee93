"""The API's runner client against a stand-in runner: NDJSON parsing, errors, and hanging up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from api.runner_client import RunnerClient
from contract.errors import (
    BUSY,
    INVALID,
    STOPPED,
    EngineBusyError,
    EngineClosedError,
    EngineError,
    EngineRequestError,
)
from contract.tokens import SamplingParams

PARAMS = SamplingParams(max_new_tokens=5, temperature=0.0)


class FakeRunner:
    """Streams one token per 10 ms as NDJSON lines split mid-line; records hang-ups."""

    def __init__(
        self, tokens: int, error_after: int | None = None, error: bytes = b"", drop: int = 0
    ):
        self.tokens, self.error_after = tokens, error_after
        self.drop = drop  # this many requests get their connection closed, with no answer
        self.error = error or b'{"error": "generation failed: RuntimeError"}\n'
        self.received: list[dict] = []
        self.hung_up = asyncio.Event()
        self.sent = 0
        self.ready_status = 200

    async def readyz(self, request: web.Request) -> web.Response:
        return web.Response(status=self.ready_status)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.received.append(await request.json())
        if len(self.received) <= self.drop:  # as a server closing an idle kept-alive connection
            request.transport.close()
            raise asyncio.CancelledError
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        try:
            for i in range(self.tokens):
                if i == self.error_after:
                    await response.write(self.error)
                    break
                last = i == self.tokens - 1
                line = json.dumps({"token_ids": [i], "finish_reason": "length" if last else None})
                half = len(line) // 2  # a transport may split anywhere
                await response.write(line[:half].encode())
                await response.write((line[half:] + "\n").encode())
                self.sent += 1
                await asyncio.sleep(0.01)
        except (ConnectionResetError, asyncio.CancelledError):
            self.hung_up.set()
            raise
        return response


@contextlib.asynccontextmanager
async def client_of(fake: FakeRunner, path: Path) -> AsyncIterator[RunnerClient]:
    """``fake`` served on a Unix socket at ``path``, and a client pointed at it."""
    app = web.Application()
    app.router.add_post("/generate", fake.generate)
    app.router.add_get("/readyz", fake.readyz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    client = RunnerClient(f"file://{path}", timeout=30)
    try:
        yield client
    finally:
        await client.close()
        await runner.cleanup()


@pytest.fixture
def socket_path(tmp_path_factory) -> Path:
    return Path(tmp_path_factory.mktemp("sock")) / "runner.sock"  # short: AF_UNIX limit


def test_streams_chunks_over_a_unix_socket(socket_path):
    fake = FakeRunner(tokens=5)

    async def run():
        async with client_of(fake, socket_path) as client:
            return [c async for c in client.generate([1, 2, 3], PARAMS)]

    chunks = asyncio.run(run())
    assert [c.token_ids[0] for c in chunks] == [0, 1, 2, 3, 4]
    assert chunks[-1].finish_reason == "length"
    assert fake.received[0]["prompt_ids"] == [1, 2, 3]
    assert fake.received[0]["max_new_tokens"] == 5


def test_a_connection_closed_before_any_answer_is_retried_once_on_a_new_one(socket_path):
    # A pooled connection the runner closes just as a request goes out: the runner never
    # started that generation, so the request goes again rather than becoming a 503.
    fake = FakeRunner(tokens=3, drop=1)

    async def run():
        async with client_of(fake, socket_path) as client:
            return [c async for c in client.generate([1, 2], PARAMS, request_id="r-1")]

    assert [c.token_ids[0] for c in asyncio.run(run())] == [0, 1, 2]
    assert [r["request_id"] for r in fake.received] == ["r-1", "r-1"]


def test_no_retry_to_a_runner_that_is_not_ready(socket_path):
    # A runner killed mid-request also closes connections with no answer; its replacement
    # is not ready yet, and the request fails at once rather than wait for it.
    gone = FakeRunner(tokens=3, drop=1)
    gone.ready_status = 503

    async def run():
        async with client_of(gone, socket_path) as client:
            return [c async for c in client.generate([1, 2], PARAMS)]

    started = time.monotonic()
    with pytest.raises(aiohttp.ClientError):
        asyncio.run(run())
    assert len(gone.received) == 1 and time.monotonic() - started < 2


def test_only_once_and_not_when_the_runner_cannot_be_reached(socket_path):
    twice = FakeRunner(tokens=3, drop=2)

    async def run():
        async with client_of(twice, socket_path) as client:
            return [c async for c in client.generate([1, 2], PARAMS)]

    with pytest.raises(aiohttp.ClientError):
        asyncio.run(run())
    assert len(twice.received) == 2

    async def unreachable():
        client = RunnerClient(f"file://{socket_path}.missing", timeout=30)
        try:
            return [c async for c in client.generate([1, 2], PARAMS)]
        finally:
            await client.close()

    with pytest.raises(aiohttp.ClientConnectorError):
        asyncio.run(unreachable())


def test_an_error_line_raises(socket_path):
    async def run():
        async with client_of(FakeRunner(tokens=5, error_after=2), socket_path) as client:
            with pytest.raises(EngineError, match="generation failed"):
                async for _ in client.generate([1], PARAMS):
                    pass

    asyncio.run(run())


def test_a_runner_at_capacity_is_told_apart_from_a_failure(socket_path):
    busy = json.dumps({"error": "the runner is at capacity", "code": BUSY}).encode() + b"\n"

    async def run():
        fake = FakeRunner(tokens=5, error_after=0, error=busy)
        async with client_of(fake, socket_path) as client:
            with pytest.raises(EngineBusyError):
                async for _ in client.generate([1], PARAMS):
                    pass

    asyncio.run(run())


def test_closing_the_stream_hangs_up_on_the_runner(socket_path):
    fake = FakeRunner(tokens=1000)

    async def run():
        async with client_of(fake, socket_path) as client:
            stream = client.generate([1], PARAMS)
            await anext(stream)
            await stream.aclose()
            await asyncio.wait_for(fake.hung_up.wait(), timeout=5)

    asyncio.run(run())
    assert fake.sent < 100  # the runner stopped long before its 1,000 tokens


def test_lines_split_inside_a_multibyte_character_are_read_whole():
    from api.runner_client import read_chunks

    line = '{"error": "caf\u00e9 failed"}\n'.encode()
    cut = line.index(b"\xa9")  # the second byte of the two-byte character

    async def pieces():
        yield line[:cut]
        yield line[cut:]

    async def run():
        async for _ in read_chunks(pieces()):
            pass

    with pytest.raises(EngineError, match="caf\u00e9 failed"):
        asyncio.run(run())


def test_readiness_follows_the_runner_and_a_missing_runner_is_not_ready(socket_path):
    fake = FakeRunner(tokens=1)

    async def run():
        async with client_of(fake, socket_path) as client:
            up = await client.ready()
            fake.ready_status = 503  # loading, or its engine stopped
            loading = await client.ready()
        absent = RunnerClient(f"file://{socket_path}", timeout=30)  # nobody listens now
        try:
            gone = await absent.ready(timeout=1)
        finally:
            await absent.close()
        return up, loading, gone

    assert asyncio.run(run()) == (True, False, False)


@pytest.mark.parametrize(
    ("line", "error", "fields"),
    [
        (
            {"error": "the prompt is too long", "code": INVALID,
             "reason": "context_length_exceeded", "param": None},
            EngineRequestError,
            {"code": "context_length_exceeded", "param": None},
        ),
        (
            {"error": "not that way", "code": INVALID, "reason": "unsupported_parameter",
             "param": "top_p"},
            EngineRequestError,
            {"code": "unsupported_parameter", "param": "top_p"},
        ),
        ({"error": "the engine stopped", "code": STOPPED}, EngineClosedError, {}),
        ({"error": "generation failed: RuntimeError"}, EngineError, {}),
    ],
)  # fmt: skip
def test_in_band_errors_say_what_kind_of_failure_they_are(line, error, fields):
    from contract.errors import from_wire

    raised = from_wire(line)
    assert type(raised) is error and str(raised) == line["error"]
    for name, value in fields.items():
        assert getattr(raised, name) == value
