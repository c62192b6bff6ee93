"""The one error family of a generation, and its one encoding for the runner hop.

An engine raises these; the runner sends them in-band as an ``{"error": ...}`` line (the
headers are gone once a stream starts), the API's runner client turns that line back into
the same exception, and the API maps each class to one HTTP answer in one place
(:func:`logic.errors.from_engine_error`). So an in-process engine (the monolith) and a remote
runner fail the same way:

=========================  =================  ========================================
class                      wire code          the API answers
=========================  =================  ========================================
:class:`EngineBusyError`   ``runner_busy``    429 ``model_at_capacity``, Retry-After
:class:`EngineRequestError` ``invalid_request`` 400 with the engine's message and code
:class:`EngineClosedError` ``engine_stopped`` 503, as for a runner that is away
:class:`EngineError`       (none)             503: the generation failed in the runner
=========================  =================  ========================================
"""

from __future__ import annotations

from typing import Any

BUSY = "runner_busy"
INVALID = "invalid_request"
STOPPED = "engine_stopped"


class EngineError(RuntimeError):
    """A generation failed in the engine or the runner; the message is for logs, not clients."""

    wire_code: str | None = None


class EngineClosedError(EngineError):
    """The engine shut down (or died) while the request was waiting or running."""

    wire_code = STOPPED


class EngineBusyError(EngineError):
    """The engine already holds as many requests as it takes (running plus waiting): back
    off and retry; not a failure."""

    wire_code = BUSY


class EngineRequestError(EngineError, ValueError):
    """The engine cannot serve this request as asked: the client's fault, a 400.

    Its message is written for the client (no internals); ``code`` is OpenAI's error code.
    """

    wire_code = INVALID

    def __init__(
        self, message: str, *, code: str | None = "invalid_value", param: str | None = None
    ):
        super().__init__(message)
        self.code = code
        self.param = param


def to_wire(exc: EngineError) -> dict[str, Any]:
    """The in-band error line a runner sends for ``exc`` (:func:`from_wire` reads it)."""
    line: dict[str, Any] = {"error": str(exc)}
    if exc.wire_code:
        line["code"] = exc.wire_code
    if isinstance(exc, EngineRequestError):
        line.update(reason=exc.code, param=exc.param)
    return line


def from_wire(data: dict[str, Any]) -> EngineError:
    """The exception an in-band ``{"error": ...}`` line stands for."""
    message, code = str(data["error"]), data.get("code")
    if code == BUSY:
        return EngineBusyError(message)
    if code == STOPPED:
        return EngineClosedError(message)
    if code == INVALID:
        return EngineRequestError(message, code=data.get("reason"), param=data.get("param"))
    return EngineError(message)
