"""One server span per request, however many chunks a stream sends (glue/tracing.py)."""

from __future__ import annotations

import asyncio

import httpx
from opentelemetry.instrumentation import asgi
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from glue.tracing import quiet_stream_spans


async def _chunks():
    for i in range(20):
        yield f"data: {i}\n\n"


async def _stream(_request):
    return StreamingResponse(_chunks(), media_type="text/event-stream")


def _spans_of_one_stream(middleware_class) -> list:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # As BentoML builds it (_bentoml_impl/server/app.py): by class, without exclude_spans.
    app = middleware_class(Starlette(routes=[Route("/stream", _stream)]), tracer_provider=provider)

    async def fetch() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return (await client.get("/stream")).text

    body = asyncio.run(fetch())
    assert body.count("data:") == 20
    return list(exporter.get_finished_spans())


def test_a_stream_gets_one_server_span_not_one_per_chunk():
    original = asgi.OpenTelemetryMiddleware  # patched already where service.py was imported
    unpatched = original.__mro__[1] if getattr(original, "_llm_quiet", False) else original
    before = _spans_of_one_stream(unpatched)
    assert len(before) > 20  # what BentoML's middleware does alone: a span per send
    try:
        asgi.OpenTelemetryMiddleware = unpatched
        quiet_stream_spans()
        quiet_stream_spans()  # idempotent
        spans = _spans_of_one_stream(asgi.OpenTelemetryMiddleware)
    finally:
        asgi.OpenTelemetryMiddleware = original
    assert len(spans) == 1
    (span,) = spans
    assert span.kind.name == "SERVER"
    status = span.attributes.get(
        "http.status_code", span.attributes.get("http.response.status_code")
    )
    assert status == 200
