"""The API side of the runner hop: stream token ids from a runner over HTTP, and hang up
when the consumer goes away.

BentoML's dependency proxy can call the runner's ``generate`` API too, but when a stream
ends early it neither closes nor releases the aiohttp response (bentoml 1.4.39,
``_bentoml_impl/client/proxy2.py``), so the runner never hears that the client left and
keeps generating for nobody. This client owns its responses: closing the stream closes
the connection, the runner's server sees the disconnect at its next token, and the engine
drops the request at its next step.

It raises the engine's own errors (:mod:`contract.errors`), decoded from the runner's
in-band error lines, so the API maps one family whichever side of the hop an engine is on.
No torch here: the API process imports this module.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import unquote, urlparse

import aiohttp
from pydantic import SecretStr

from contract.errors import from_wire
from contract.tokens import GenerationChunk, SamplingParams

# Seconds an idle connection to the runner is kept for reuse: below the runner's own.
_IDLE_CONNECTION_SECONDS = 2.0
# How long a runner that dropped a request may take to say it is ready, for a retry.
_RETRY_READY_SECONDS = 1.0
# How a request fails when its connection was closed under it before any answer.
_DROPPED_BEFORE_ANSWER = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientConnectionResetError,
    aiohttp.ClientOSError,
)


async def read_chunks(stream: AsyncIterator[str | bytes]) -> AsyncIterator[GenerationChunk]:
    """Parse the runner's NDJSON stream, whatever the transport did to chunk borders."""
    buffer = b""
    try:
        async for piece in stream:
            # Split on newlines before decoding: a chunk border may cut a UTF-8 character.
            buffer += piece if isinstance(piece, bytes) else piece.encode()
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line:
                    continue
                if line.startswith(b'{"error"'):  # how the runner writes its error lines
                    raise from_wire(json.loads(line))
                # Parsed and checked in one pass (pydantic-core's JSON), not json.loads first.
                yield GenerationChunk.model_validate_json(line)
    finally:  # an async generator source is closed now, not whenever it is collected
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


class RunnerClient:
    """Streams ``generate`` from a runner at ``url``: ``http(s)://host:port``, ``tcp://host:port``
    or ``file:///path/to.sock`` (what ``bentoml serve`` hands its services)."""

    def __init__(self, url: str, *, timeout: float, connect_timeout: float = 5.0):
        self.url = url
        # No limit on a whole stream (a long answer is not a failure); ``timeout`` bounds the
        # wait for each next piece, queueing in the runner included. ``connect_timeout`` bounds
        # how long a request waits on a runner host that does not answer at all.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _make_session(self) -> aiohttp.ClientSession:
        parsed = urlparse(self.url)
        # limit=0: every open stream holds a connection, and the runner batches them all.
        # An idle connection is dropped before the runner's server drops it (uvicorn: 5 s).
        options = {"limit": 0, "keepalive_timeout": _IDLE_CONNECTION_SECONDS}
        connector: aiohttp.BaseConnector
        if parsed.scheme == "file":
            connector = aiohttp.UnixConnector(path=unquote(parsed.path), **options)
            base = "http://runner"
        else:
            connector = aiohttp.TCPConnector(**options)
            base = f"http://{parsed.netloc}" if parsed.scheme == "tcp" else self.url.rstrip("/")
        return aiohttp.ClientSession(base_url=base, connector=connector, timeout=self._timeout)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._make_session()  # inside the worker's event loop
        return self._session

    @property
    def is_local(self) -> bool:
        """Whether the runner is a sibling process of the same ``bentoml serve`` (a socket it
        handed us) rather than a server given by URL."""
        return urlparse(self.url).scheme in ("file", "tcp")

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None
    ) -> AsyncIterator[GenerationChunk]:
        payload = {"prompt_ids": prompt_ids, "request_id": request_id, **params.model_dump()}
        headers = {"X-Request-ID": request_id} if request_id else None
        try:
            response = await self.session.post("/generate", json=payload, headers=headers)
        except _DROPPED_BEFORE_ANSWER as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise  # the runner cannot be reached: no second wait
            # A kept-alive connection the runner closed as we sent: it never started this
            # generation, so send it once more, on a new connection; but only to a runner
            # that answers now. One that died (killed mid-answer) is replaced behind the same
            # socket by `bentoml serve`, and a retry would wait there for a whole restart
            # (40 s and more for vLLM) instead of failing fast with a 503.
            if not await self.ready(timeout=_RETRY_READY_SECONDS):
                raise
            response = await self.session.post("/generate", json=payload, headers=headers)
        try:
            if response.status >= 400:
                detail = (await response.text())[:200]
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=detail
                )
            async for chunk in read_chunks(response.content.iter_any()):
                yield chunk
        finally:
            response.close()  # unread body: drop the connection, so the runner hears it

    async def ready(self, timeout: float = 2.0) -> bool:
        """Whether the runner answers its ``/readyz`` with a 200 within ``timeout`` seconds."""
        try:
            async with self.session.get(
                "/readyz", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def metrics(self, key: SecretStr | None = None, timeout: float = 2.0) -> str:
        """The runner's own ``llm_runner_*`` series from its ``/metrics`` ("" if unreachable)."""
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else None
        try:
            async with self.session.get(
                "/metrics", headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                if response.status != 200:
                    return ""
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return ""
        ours = ("llm_runner_", "# HELP llm_runner_", "# TYPE llm_runner_")
        lines = [line for line in text.splitlines() if line.startswith(ours)]
        return "\n".join(lines) + "\n" if lines else ""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
