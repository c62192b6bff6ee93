"""The OpenAPI 3.1 description of the ``/v1`` routes, served at ``/v1/openapi.json``.

BentoML's own ``/docs.json`` describes its native endpoints and health routes but not an
ASGI app mounted beside them, so the OpenAI-compatible routes describe themselves here, from
the same pydantic models that validate requests and build responses.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from logic.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)

_REF = "#/components/schemas/{model}"

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

# One server-sent event: its data is a chunk's JSON, an error's JSON, or [DONE] at the end.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}

# Statuses every /v1 route may answer besides its success, and why.
_ERRORS = {
    "400": "Invalid request: bad JSON, a bad parameter, or a prompt over the context window.",
    "401": "The API key is required and was missing or wrong.",
    "404": "Unknown model.",
    "413": "The request body is over LLM_MAX_REQUEST_BYTES.",
    "422": "The answer could not satisfy response_format.",
    "429": "At capacity: retry after the Retry-After header's seconds.",
    "503": "The model runner is unavailable: retry after Retry-After.",
    "504": "The generation passed LLM_API_TIMEOUT or LLM_STREAM_IDLE_TIMEOUT.",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _responses(ok: dict[str, Any], statuses: tuple[str, ...] = tuple(_ERRORS)) -> dict:
    error = {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}}
    return {
        "200": ok,
        **{status: {"description": _ERRORS[status], "content": error} for status in statuses},
    }


def _generation(request: type[BaseModel], whole: type[BaseModel], chunk: type[BaseModel]) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(request)}},
        },
        "responses": _responses(
            {
                "description": "The whole answer, or server-sent events of "
                f"{chunk.__name__} when the request sets stream (ending with [DONE]).",
                "content": {
                    "application/json": {"schema": _ref(whole)},
                    "text/event-stream": {"schema": _SSE_EVENT},
                },
            }
        ),
    }


def openapi_spec(title: str = "OpenAI-compatible API", version: str = "1") -> dict[str, Any]:
    """The spec of ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``."""
    models = [ChatCompletionRequest, CompletionRequest]
    outputs = [ChatCompletionResponse, ChatCompletionChunk, CompletionResponse, ModelList]
    _, schemas = models_json_schema(
        [(m, "validation") for m in models] + [(m, "serialization") for m in outputs],
        ref_template=_REF,
    )
    components = {**schemas.get("$defs", {}), "ErrorResponse": _ERROR}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "servers": [{"url": "/v1"}],
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        # The key is needed only when LLM_API_KEY is set; {} says "or none".
        "security": [{"bearer": []}, {}],
        "paths": {
            "/chat/completions": {
                "post": {
                    "operationId": "createChatCompletion",
                    **_generation(
                        ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk
                    ),
                }
            },
            "/completions": {
                "post": {
                    "operationId": "createCompletion",
                    **_generation(CompletionRequest, CompletionResponse, CompletionResponse),
                }
            },
            "/models": {
                "get": {
                    "operationId": "listModels",
                    "responses": _responses(
                        {
                            "description": "The served model.",
                            "content": {"application/json": {"schema": _ref(ModelList)}},
                        },
                        ("401",),
                    ),
                }
            },
        },
    }
