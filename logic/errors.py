"""Errors the API returns, each carrying its HTTP status and an OpenAI-shaped body.

Business logic raises these; ``service.py`` turns any of them into a response with
:func:`APIError.to_body`. Anything else becomes a generic 500 whose body says nothing of
the internals.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from contract.errors import EngineBusyError, EngineClosedError, EngineError, EngineRequestError


class APIError(Exception):
    """Base of every error a client may see."""

    status_code = 500
    error_type = "server_error"
    # Seconds a client should wait before retrying (the Retry-After header), when it should.
    retry_after: int | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status_code is not None:
            self.status_code = status_code

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str):
        super().__init__(
            f"The model '{model}' does not exist.",
            param="model",
            code="model_not_found",
        )


class RunnerUnavailableError(APIError):
    """The model runner cannot be reached or failed; retrying later may succeed."""

    status_code = 503
    error_type = "service_unavailable"
    retry_after = 2

    def __init__(self, message: str = "The model runner is unavailable; retry shortly."):
        super().__init__(message, code="runner_unavailable")


class AuthenticationError(APIError):
    """401: the request did not carry the API key the service was configured with."""

    status_code = 401
    error_type = "invalid_request_error"

    def __init__(self) -> None:
        super().__init__(
            "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )


class RequestTooLargeError(InvalidRequestError):
    """413: the body is over the service's size limit."""

    status_code = 413

    def __init__(self, limit: int):
        super().__init__(
            f"The request body is larger than this server accepts ({limit} bytes).",
            code="request_too_large",
        )


class RateLimitError(APIError):
    """429: this worker is already serving as many requests as it is allowed to."""

    status_code = 429
    error_type = "rate_limit_error"
    retry_after = 1

    def __init__(self, limit: int):
        super().__init__(
            f"Too many concurrent requests (this worker serves {limit} at a time); retry shortly.",
            code="rate_limit_exceeded",
        )


class ModelBusyError(APIError):
    """429: the runner already holds all the requests it takes; retrying shortly may succeed."""

    status_code = 429
    error_type = "rate_limit_error"
    retry_after = 1

    def __init__(self) -> None:
        super().__init__("The model is at capacity; retry shortly.", code="model_at_capacity")


class GenerationTimeoutError(APIError):
    """504: the generation ran past the request's deadline, or the runner went quiet."""

    status_code = 504
    error_type = "timeout_error"

    def __init__(self, which: str, seconds: float | None):
        what = (
            "The request ran past its time limit"
            if which == "total"
            else "The model sent nothing for too long"
        )
        super().__init__(f"{what} ({seconds:g} s); the generation was stopped.", code="timeout")


class UnprocessableError(InvalidRequestError):
    """422: the request was valid, but the model's answer cannot satisfy it (for example a
    ``response_format`` the answer fails)."""

    status_code = 422


class InternalServerError(APIError):
    def __init__(self) -> None:
        super().__init__("The server had an error while processing your request.")


def format_loc(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "role")`` -> ``"messages[0].role"``, the way OpenAI names params."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation_error(exc: ValidationError) -> InvalidRequestError:
    """The first validation problem, as a 400 that names the offending field."""
    errors = exc.errors(include_url=False)
    # A union reports one error per member; a wrong-type complaint about the member the
    # client did not mean ("should be a valid string" for a list) is the least useful one.
    root = errors[0]["loc"][:1]
    err = next(
        (e for e in errors if e["loc"][:1] == root and not e["type"].endswith("_type")),
        errors[0],
    )
    # Union members and validators add their own names to the location; keep the field path.
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or not _is_type_tag(p))
    param = format_loc(loc) or None
    kind = err["type"]
    if kind == "extra_forbidden":
        return InvalidRequestError(
            f"Unsupported parameter: '{param}'.",
            param=param,
            code="unsupported_parameter",
        )
    if kind == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    message = err["msg"].removeprefix("Value error, ")
    return InvalidRequestError(
        f"Invalid value for '{param}': {message}." if param else f"{message}.",
        param=param,
        code="invalid_value",
    )


def _is_type_tag(part: str) -> bool:
    # pydantic puts union member names such as "str", "constrained-str" or "list[...]"
    # into error locations; request fields are plain identifiers.
    return not part.isidentifier() or part in {"str", "int", "float", "bool", "list", "dict"}


def from_engine_error(exc: EngineError) -> APIError:
    """The API's answer to a generation's failure, in-process engine or remote runner alike
    (contract/errors.py): at capacity is a 429, a request the engine cannot serve as asked a
    400, a stopped engine a 503 (as a runner that is away), a generation that failed in the
    runner a 500 (its details stay in the runner's log)."""
    if isinstance(exc, EngineBusyError):
        return ModelBusyError()
    if isinstance(exc, EngineRequestError):
        return InvalidRequestError(str(exc), code=exc.code, param=exc.param)
    if isinstance(exc, EngineClosedError):
        return RunnerUnavailableError()
    return InternalServerError()
