"""Bearer keys: the API key on ``/v1`` and the optional key on ``/metrics``.

Keys are :class:`pydantic.SecretStr` in the settings, so printing or logging the settings
shows ``**********``; they are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from pydantic import SecretStr
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# OpenAI's 401 body, as the API's own AuthenticationError writes it (logic/errors.py).
UNAUTHORIZED = {
    "error": {
        "message": "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


def bearer_matches(scope: Scope, key: SecretStr) -> bool:
    """Whether the request's ``Authorization: Bearer <token>`` is ``key``."""
    header = dict(scope.get("headers") or []).get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    expected = key.get_secret_value().encode()
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected)


class MetricsGuard:
    """ASGI middleware for a whole service: ``/metrics`` answers 401 without the Bearer key
    that ``key()`` gives (the service's ``LLM_METRICS_API_KEY``) when one is set. Health
    routes stay open."""

    def __init__(self, app: ASGIApp, key: Callable[[], SecretStr | None]):
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.key()
        if (
            key is not None
            and scope["type"] == "http"
            and scope["path"].rstrip("/") == "/metrics"
            and not bearer_matches(scope, key)
        ):
            response = JSONResponse(UNAUTHORIZED, 401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)
