"""Bearer keys: the API key on ``/v1`` and the optional key on ``/metrics``.

Keys are :class:`pydantic.SecretStr` in the settings, so printing or logging the settings
shows ``**********``; they are compared in constant time.
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from logic.errors import AuthenticationError
from logic.settings import get_settings


def bearer_matches(scope: Scope, key: SecretStr) -> bool:
    """Whether the request's ``Authorization: Bearer <token>`` is ``key``."""
    header = dict(scope.get("headers") or []).get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    expected = key.get_secret_value().encode()
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected)


class MetricsGuard:
    """ASGI middleware for a whole service: ``/metrics`` answers 401 without the Bearer key
    ``LLM_METRICS_API_KEY`` when that is set. Health routes stay open."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = get_settings().metrics_api_key
        if (
            key is not None
            and scope["type"] == "http"
            and scope["path"].rstrip("/") == "/metrics"
            and not bearer_matches(scope, key)
        ):
            error = AuthenticationError()
            response = JSONResponse(
                error.to_body(), error.status_code, headers={"WWW-Authenticate": "Bearer"}
            )
            return await response(scope, receive, send)
        await self.app(scope, receive, send)
