"""What the engines raise to their callers; torch-free, so the API process may import it."""

from __future__ import annotations


class EngineClosedError(RuntimeError):
    """The engine shut down (or died) while the request was waiting or running."""


class EngineBusyError(RuntimeError):
    """The engine already holds as many requests as it takes (running plus waiting)."""


class EngineRequestError(ValueError):
    """The engine cannot serve this request as asked: the client's fault, a 400.

    Its message is written for the client (no internals); ``code`` is OpenAI's error code.
    """

    def __init__(self, message: str, *, code: str = "invalid_value", param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param
