"""The bundle's services: read top to bottom to see the whole request path.

    client --HTTP/SSE--> ChatAPI (CPU, logic/) --bentoml.depends--> LLMRunner (GPU, runners/)

- ``ChatAPI`` (entry service, ``bentoml serve``): the OpenAI-compatible routes under
  ``/v1``. All business logic (validation, prompt policy, chat template, tokenization,
  detokenization, stop strings, usage) runs here, in several CPU workers that never import
  torch. It sends token ids to the runner and streams token ids back.
- ``LLMRunner`` (``runners/llm.py``): one worker that owns the model and the device.
- ``Monolith`` (``bentoml serve service:Monolith``): the same routes and logic with the
  engine in the same process, for one small machine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import bentoml
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from contract.errors import EngineError
from contract.settings import tokenizer_tag
from contract.tokens import GenerationChunk, SamplingParams
from glue.auth import MetricsGuard, bearer_matches
from glue.bento import RUNNER_SERVICE, pin_bento_model, runner_mapping_url
from glue.image import bento_image, image_envs
from glue.logs import configure_worker_logging, incoming_request_id, request_id
from glue.request_timeout import fix_request_timeout
from glue.settings import build_settings
from glue.tracing import quiet_stream_spans
from logic import metrics
from logic.errors import (
    APIError,
    AuthenticationError,
    InternalServerError,
    InvalidRequestError,
    RateLimitError,
    RequestTooLargeError,
    RunnerUnavailableError,
    from_engine_error,
    from_validation_error,
)
from logic.openapi import openapi_spec
from logic.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    GenerationRequest,
)
from logic.settings import get_settings

if TYPE_CHECKING:
    from api.router import RunnerPool
    from logic.chat import CompletionService, TokenGenerator

logger = logging.getLogger(__name__)
# Inside a built Bento, the model version it recorded (glue/bento.py).
settings = pin_bento_model(get_settings())
fix_request_timeout()
quiet_stream_spans()
# An API-only process (LLM_RUNNER_URL) has no runner in its graph and never imports runners/:
# the API-only Bento does not even pack it. Otherwise the runner is declared here (runners/
# imports no torch until it builds an engine), and Monolith can run its engine in-process.
if not settings.runner_url:
    from runners.llm import DECLARED_ENGINE, RUNNER_EXTRAS, RUNNER_ON_LLAMACPP, LLMRunner
# BentoML's own request timeout sits a little past ours (LLM_API_TIMEOUT, enforced in logic/),
# so ours fires first: it stops the generation and answers with an OpenAI-shaped 504.
_TIMEOUT_MARGIN = 10


# ---------------------------------------------------------------- the OpenAI-compatible routes


def _error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    metrics.ERRORS.labels(code=error.code or error.error_type).inc()
    headers = dict(headers or {})
    if error.retry_after:
        headers["Retry-After"] = str(error.retry_after)
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=headers)


async def _handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return _error_response(exc)


async def _handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = InvalidRequestError(str(exc.detail), status_code=exc.status_code)
    return _error_response(error, exc.headers)  # a 405 keeps its Allow header


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s", request.url.path)
    return _error_response(InternalServerError())


async def _read_body(request: Request) -> bytes:
    """The body, refused with a 413 as soon as it is over the limit (declared or streamed)."""
    limit = settings.max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(limit)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise RequestTooLargeError(limit)
    return bytes(body)


async def _read_request(request: Request, schema: type[GenerationRequest]) -> Any:
    raw = await _read_body(request)
    try:
        body = json.loads(raw)
        # Lone surrogates ("\ud800") parse but cannot be tokenized or echoed back.
        json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeError, huge ints
        raise InvalidRequestError(
            "We could not parse the JSON body of your request. Send valid JSON.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    try:
        # Strict: "16" or true is not a number here, as in OpenAI's API (JSON numbers only).
        return schema.model_validate(body, strict=True)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


async def _event_stream(first: BaseModel, rest: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events; an error after the first byte becomes an error event."""
    async with contextlib.aclosing(rest):  # a client that leaves cancels the generation
        yield _sse(first.model_dump_json())
        try:
            async for chunk in rest:
                yield _sse(chunk.model_dump_json())
        except Exception as exc:
            if not isinstance(exc, APIError):
                logger.exception("stream failed")
                exc = InternalServerError()
            metrics.ERRORS.labels(code=exc.code or exc.error_type).inc()
            yield _sse(json.dumps(exc.to_body()))
    yield _sse("[DONE]")


async def _respond(
    body: GenerationRequest,
    create: Callable[[Any], Awaitable[BaseModel]],
    create_stream: Callable[[Any], AsyncIterator[BaseModel]],
) -> Response:
    """A whole JSON answer, or server-sent events when the request streams."""
    if not body.stream:
        response = await create(body)
        return JSONResponse(response.model_dump(mode="json"))
    chunks = create_stream(body)
    # Wait for the first chunk (the runner's first token) before sending headers, so a
    # runner failure is still a proper status code rather than a broken stream.
    first = await anext(chunks)
    return StreamingResponse(
        _event_stream(first, chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def chat_completions(request: Request) -> Response:
    chat: CompletionService = request.app.state.chat
    body = await _read_request(request, ChatCompletionRequest)
    return await _respond(body, chat.create, chat.create_stream)


async def completions(request: Request) -> Response:
    chat: CompletionService = request.app.state.chat
    body = await _read_request(request, CompletionRequest)
    return await _respond(body, chat.create_completion, chat.create_completion_stream)


async def list_models(request: Request) -> Response:
    chat: CompletionService = request.app.state.chat
    return JSONResponse(chat.models().model_dump(mode="json"))


_OPENAPI = openapi_spec()


async def openapi(request: Request) -> Response:
    """These routes' OpenAPI spec (BentoML's /docs.json covers only its native endpoints)."""
    return JSONResponse(_OPENAPI)


_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_ROUTES = [
    Route("/chat/completions", chat_completions, methods=["POST"]),
    Route("/completions", completions, methods=["POST"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]


async def unknown_route(request: Request) -> Response:
    """Anything else under /v1: an OpenAI-shaped 404 (or 405), not a plain-text page."""
    path = request.url.path
    known = next((route for route in _ROUTES if path.endswith(route.path)), None)
    if known is None:
        return _error_response(
            InvalidRequestError(f"Unknown route: {request.method} {path}", status_code=404)
        )
    allowed = ", ".join(sorted(known.methods or ()))
    return _error_response(
        InvalidRequestError(f"Method not allowed: {request.method} {path}", status_code=405),
        {"Allow": allowed},
    )


def _route_label(scope: Scope) -> str:
    """The route a request is counted under: one of ours, or "other" (bounded labels)."""
    path = scope["path"]
    root = scope.get("root_path", "")
    local = path[len(root) :] if root and path.startswith(root) else path
    known = {route.path for route in _ROUTES}
    return f"{root}{local}" if local in known else "other"


class Gate:
    """ASGI middleware in front of the routes: the request id, the API key (401), this
    worker's limit on requests in flight (429; a stream counts until its last byte), and the
    request's metrics."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        rid = incoming_request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
        # Not reset on the way out: BentoML's access log line, written after this returns in
        # the same task, carries the id too. Each request runs in a task of its own.
        request_id.set(rid)
        status, started = 500, time.perf_counter()

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", rid.encode())]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        error: APIError | None = None
        if settings.api_key and not bearer_matches(scope, settings.api_key):
            error = AuthenticationError()
        elif self.in_flight >= settings.max_concurrent_requests:
            error = RateLimitError(settings.max_concurrent_requests)
        metrics.IN_FLIGHT.inc()
        self.in_flight += 1
        try:
            if error is not None:
                await _error_response(error)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            self.in_flight -= 1
            metrics.IN_FLIGHT.dec()
            route = _route_label(scope)
            metrics.REQUESTS.labels(route=route, status=str(status)).inc()
            metrics.REQUEST_SECONDS.labels(route=route).observe(time.perf_counter() - started)


def create_openai_app() -> Starlette:
    """The ``/v1`` routes; ``app.state.chat`` is set by the service that mounts it."""
    middleware = [Middleware(Gate)]
    origins = [o.strip() for o in settings.cors_allow_origins.split(",") if o.strip()]
    if origins:  # outermost: a browser's preflight carries no API key
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                max_age=600,
            ),
        )
    return Starlette(
        routes=[*_ROUTES, Route("/{path:path}", unknown_route, methods=_ALL_METHODS)],
        exception_handlers={
            APIError: _handle_api_error,
            HTTPException: _handle_http_exception,
            Exception: _handle_unexpected,
        },
        middleware=middleware,
    )


def _chat_service(model: bentoml.Model, generate: TokenGenerator) -> CompletionService:
    # The request path's modules (the tokenizer, the JSON-Schema validator, aiohttp for the
    # runner) load here, in the processes that serve requests, not at import: `bentoml serve`
    # imports this module in the runner's process too, where they cost 17 MiB in all.
    from logic.chat import CompletionService
    from logic.model_files import ModelFiles

    return CompletionService(
        ModelFiles.load(model.path),
        settings,
        generate,
        fingerprint=f"fp_{model.tag.version}",
    )


# ---------------------------------------------------------------- native BentoML API


class NativeAPI:
    """Typed BentoML endpoints beside the OpenAI routes, for ``bentoml.SyncHTTPClient`` and
    ``AsyncHTTPClient``: ``chat`` returns a whole answer, ``chat_stream`` streams its text.
    Same business logic, same errors (as BentoML errors with the same status codes)."""

    chat: CompletionService

    @bentoml.api
    async def chat_completion(
        self,
        messages: list[ChatMessage],
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> ChatCompletionResponse:
        """A whole chat completion, in OpenAI's response shape."""
        request = _native_request(locals())
        with _as_bentoml_errors():
            return await self.chat.create(request)

    @bentoml.api
    async def chat_stream(
        self,
        messages: list[ChatMessage],
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> AsyncGenerator[str, None]:
        """The answer's text, streamed piece by piece."""
        request = _native_request({**locals(), "stream": True})
        with _as_bentoml_errors():
            chunks = self.chat.create_stream(request)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield choice.delta.content


def _native_request(args: dict) -> ChatCompletionRequest:
    fields = {k: v for k, v in args.items() if k != "self" and v is not None}
    with _as_bentoml_errors():
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValidationError as exc:
            raise from_validation_error(exc) from None


@contextlib.contextmanager
def _as_bentoml_errors() -> Iterator[None]:
    """An :class:`APIError` as the BentoML error of the same HTTP status."""
    try:
        yield
    except APIError as exc:
        where = f" (param: {exc.param})" if exc.param else ""
        raise bentoml.exceptions.BentoMLException(
            exc.message + where, error_code=HTTPStatus(exc.status_code)
        ) from None


# ---------------------------------------------------------------- split topology: API + runner

api_app = create_openai_app()


@functools.cache
def _runner_transport_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the runner could not be reached or dropped the connection": our
    client's (aiohttp, OSError) and those of BentoML's in-process dependency (tests with
    to_asgi). aiohttp is imported here, not at the top: see ``_chat_service``."""
    import aiohttp

    return (aiohttp.ClientError, OSError, bentoml.exceptions.BentoMLException)


async def _relay(stream: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    """The runner's token stream, its failures as API errors (one mapping for the engine's
    error family, ``from_engine_error``; a runner that cannot be reached is a 503). Closing
    this closes ``stream``, which cancels the generation."""
    try:
        async with contextlib.aclosing(stream) as chunks:
            async for chunk in chunks:
                yield chunk
    except EngineError as exc:
        error = from_engine_error(exc)
        if isinstance(error, RunnerUnavailableError):
            logger.warning("runner unavailable: %s", exc)
        elif isinstance(error, InternalServerError):
            logger.error("generation failed in the runner: %s", exc)
        raise error from None
    except _runner_transport_errors() as exc:
        logger.warning("runner unavailable: %s", exc)
        raise RunnerUnavailableError() from exc


@bentoml.asgi_app(api_app, path="/v1")
@bentoml.service(
    resources={"cpu": settings.api_cpu, "memory": settings.api_memory},
    workers=settings.api_workers,
    traffic={"timeout": settings.api_timeout + _TIMEOUT_MARGIN},
    # BentoML's own probe answers 500 when the runner refuses connections; __is_ready__ below
    # does the check instead, and only where the settings ask for it.
    runner_probe={"enabled": False},
    # Recorded in the Bento at build time: the image serves the model it was built with.
    labels={"model": settings.model},
    envs=[{"name": "LLM_MODEL", "value": settings.model}]
    # An API-only Bento's image points at the runner it was built for unless told otherwise.
    + ([{"name": "LLM_RUNNER_URL", "value": settings.runner_url}] if settings.runner_url else [])
    + image_envs(build_settings(), with_runner=not settings.runner_url),
    # Its Bento's image: with the runner (and torch) unless the runner is elsewhere.
    image=bento_image(
        build_settings(),
        extras=("api",) if settings.runner_url else ("api", *RUNNER_EXTRAS),
        with_runner=not settings.runner_url,
        llamacpp=not settings.runner_url and RUNNER_ON_LLAMACPP,
    ),
)
class ChatAPI(NativeAPI):
    """OpenAI-compatible API: all business logic on CPU; the model is a dependency."""

    # The runner: served beside this API, or, with LLM_RUNNER_URL, a runner elsewhere. Then
    # no BentoML dependency is declared at all: the runner is no part of this service's graph
    # (`bentoml serve` starts none, and a Bento built so holds the API alone: no torch, no
    # weights), and nothing asks the runner for anything before a request does. (A
    # `bentoml.depends(url=...)` would: BentoML fetches its schema when a worker starts, so an
    # API started before its runner, or while it restarts, would fail to start.)
    runner = None if settings.runner_url else bentoml.depends(LLMRunner)
    # The model's tokenizer entry (runners/import_model.py): tokenizer, template and config,
    # not the weights, which only the runner declares.
    model = bentoml.models.BentoModel(tokenizer_tag(settings.model))

    def __init__(self) -> None:
        configure_worker_logging("ChatAPI", settings.log_format, settings.log_level)
        self.chat = _chat_service(self.model, self._generate)
        api_app.state.chat = self.chat
        self._runners = self._runner_pool()

    def _runner_pool(self) -> RunnerPool | None:
        """Our own HTTP client for the runner's URL (see api/runner_client.py for why), one
        per replica when LLM_RUNNER_URL names several (api/router.py routes between them).

        The URL is the runner process ``bentoml serve`` started, or the one given with
        ``--depends LLMRunner=URL`` when the runner runs elsewhere. Without one, BentoML would
        build the runner inside this process: that is allowed only outside a server (tests with
        ``to_asgi``); a served API without a runner URL refuses to start rather than load the
        model onto a CPU worker.
        """
        from api.router import RouterSettings, RunnerPool, parse_runner_urls
        from api.runner_client import RunnerClient

        url = _runner_url()
        if not url:
            if bentoml.server_context.worker_index is not None:
                raise RuntimeError(
                    "ChatAPI has no runner URL. Serve both with `bentoml serve service:ChatAPI`, "
                    "or point this API at a runner with `--depends LLMRunner=http://HOST:PORT` "
                    "(see README, Remote topology); `service:Monolith` runs the model in-process."
                )
            self.runner  # noqa: B018 - BentoML builds the runner here, in this process
            return None
        urls = parse_runner_urls(url)
        logger.info("runner at %s", ", ".join(urls))
        return RunnerPool(
            urls,
            RouterSettings(**settings.router_options()),
            lambda replica: RunnerClient(
                replica,
                timeout=settings.runner_timeout,
                connect_timeout=settings.runner_connect_timeout,
            ),
            metrics_key=settings.metrics_api_key,
        )

    async def __is_ready__(self) -> bool:
        """``/readyz``: this API is up and, unless ``LLM_READY_REQUIRES_RUNNER=false``, so is
        the runner it points at. ``/livez`` never looks at the runner: a runner that is away
        must not get the API restarted."""
        if self._runners is None or not settings.ready_requires_runner:
            return True
        return await self._runners.ready()

    async def __metrics__(self, content: str) -> str:
        """``/metrics``: BentoML's series and ours (all API workers), then the runner's
        ``llm_runner_*`` load when the runner was started by the same ``bentoml serve`` (a
        runner elsewhere is scraped on its own port, so its series are not counted twice)."""
        single = self._runners.single if self._runners is not None else None
        if single is not None and single.client.is_local:
            content += await single.client.metrics(settings.metrics_api_key)
        return content

    @bentoml.on_startup
    async def _watch_runner_replicas(self) -> None:
        """Each API worker probes its runner replicas from the start, not from its first
        request: a worker that has served nothing yet must still know which are up."""
        if self._runners is not None:
            self._runners.start()

    @bentoml.on_shutdown
    async def _close_runner_client(self) -> None:
        if self._runners is not None:
            await self._runners.close()

    async def _generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        rid = request_id.get()  # the runner logs its side of the request under the same id
        if self._runners is not None:
            stream = self._runners.generate(prompt_ids, params, request_id=rid)
        else:
            from api.runner_client import read_chunks

            stream = read_chunks(
                self.runner.generate(prompt_ids=prompt_ids, request_id=rid, **params.model_dump())
            )
        async for chunk in _relay(stream):
            yield chunk


def _runner_url() -> str | None:
    """Where the runner is, without resolving the dependency: the runner mapping that
    ``bentoml serve`` (and ``--depends LLMRunner=URL``) hands each worker, which is what
    ``bentoml.depends`` itself reads, else ``LLM_RUNNER_URL``. None: BentoML would build
    the runner in-process."""
    return runner_mapping_url(RUNNER_SERVICE) or settings.runner_url or None


# ---------------------------------------------------------------- monolith: one process

monolith_app = create_openai_app()


@bentoml.asgi_app(monolith_app, path="/v1")
@bentoml.service(
    # Its engine's GPUs, none for llama.cpp (BentoML takes no `gpu: 0`). (An API-only
    # process, LLM_RUNNER_URL set, does not read runners/ to declare it; serving Monolith
    # there, from a source tree, ignores the URL as before.)
    resources={"gpu": 1 if settings.runner_url else DECLARED_ENGINE.gpus}
    if settings.runner_url or DECLARED_ENGINE.gpus
    else {},
    workers=1,
    traffic={"timeout": settings.api_timeout + _TIMEOUT_MARGIN},
)
class Monolith(NativeAPI):
    """The same API with the engine in-process: one process, no hop, no separate scaling."""

    model = bentoml.models.BentoModel(settings.model)

    def __init__(self) -> None:
        configure_worker_logging("Monolith", settings.log_format, settings.log_level)
        from runners.llm import create_engine  # not at the top: see the runners/ import there

        self.engine = create_engine(self.model.path)
        self.chat = _chat_service(
            self.model, lambda prompt_ids, params: _relay(self.engine.stream(prompt_ids, params))
        )
        monolith_app.state.chat = self.chat

    def __metrics__(self, content: str) -> str:
        """``/metrics``: BentoML's series, the API's, and the in-process engine's load."""
        from runners.metrics import engine_metrics

        return content + engine_metrics(self.engine)

    @bentoml.on_shutdown
    def _close_engine(self) -> None:
        """After the graceful drain: stop the engine (vLLM: its engine-core processes too)."""
        self.engine.close()


class NativeJSONOnly:
    """The native endpoints take JSON: any other declared body type is a 415 here, before
    BentoML's own parser (which answers a malformed multipart header with a 500)."""

    paths = ("/chat_completion", "/chat_stream")

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            declared = dict(scope.get("headers") or []).get(b"content-type", b"")
            media = declared.split(b";", 1)[0].strip().lower()
            if media and media != b"application/json":
                error = InvalidRequestError(
                    "Send the body as JSON (Content-Type: application/json).",
                    code="unsupported_media_type",
                    status_code=415,
                )
                return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


for _service in (ChatAPI, Monolith):
    _service.add_asgi_middleware(NativeJSONOnly)
    # /metrics behind LLM_METRICS_API_KEY when that is set (the runner does the same).
    _service.add_asgi_middleware(MetricsGuard, key=lambda: settings.metrics_api_key)
