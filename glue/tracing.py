"""One request, one server span: no tracing span for every ``send`` of a stream.

BentoML 1.4 wraps every service in OpenTelemetry's ASGI middleware without its
``exclude_spans`` option, so the middleware opens (and ends) a child span for every ASGI
``send`` and ``receive``: for a stream, one span per token, on the API and again on the
runner. Measured with py-spy on a 1-client stream on llama.cpp: a fifth of the API worker's
per-token CPU and a third of the runner loop's, on cores the model's threads need; and a
trace of a 500-token answer held a thousand spans that say nothing a span per request does
not. The request's own server span stays, with its attributes, status and duration (and so
does any span users open themselves).

BentoML imports the middleware class by name when it builds each app, so the module's class
is replaced by a subclass whose ``exclude_spans`` defaults to both, before the app is built.
"""

from __future__ import annotations

from typing import Any


def quiet_stream_spans() -> None:
    """Make OpenTelemetry's ASGI middleware, as BentoML builds it, skip send/receive spans
    (idempotent; callers that pass ``exclude_spans`` themselves keep theirs)."""
    from opentelemetry.instrumentation import asgi

    base = asgi.OpenTelemetryMiddleware
    if getattr(base, "_llm_quiet", False):
        return

    class OneSpanPerRequest(base):  # type: ignore[misc, valid-type]
        _llm_quiet = True

        def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("exclude_spans", ["receive", "send"])
            super().__init__(app, *args, **kwargs)

    OneSpanPerRequest.__name__ = OneSpanPerRequest.__qualname__ = base.__name__
    asgi.OpenTelemetryMiddleware = OneSpanPerRequest
