"""``response_format``: what a chat answer's format asks of the prompt, of the runner's
decoding, and of the whole answer.

- :func:`check`: a schema that is not one is a 400;
- :func:`instruction`: what the model is told;
- :func:`structured_output`: what the runner constrains decoding to;
- :func:`enforce`: the whole answer checked against the format (a 422 when it fails).

:mod:`logic.output_plan` puts these together with the tools' own.
"""

from __future__ import annotations

import json

from contract.tokens import StructuredOutput
from logic.errors import InvalidRequestError, UnprocessableError
from logic.json_output import (
    JSONExtractionError,
    cut_at,
    is_json,
    json_answer,
    schema_errors,
    validation_errors,
)
from logic.protocol import ResponseFormat


def check(response_format: ResponseFormat | None) -> None:
    """A JSON schema that is not one is refused up front (400). What the runner cannot compile
    for constrained decoding it refuses itself, also with a 400 that names the problem."""
    if response_format is None or response_format.type != "json_schema":
        return
    problems = schema_errors(response_format.json_schema.json_schema)
    if problems:
        raise InvalidRequestError(
            f"Invalid JSON schema: {'; '.join(problems[:3])}.",
            param="response_format.json_schema.schema",
            code="invalid_value",
        )


def structured_output(response_format: ResponseFormat | None) -> StructuredOutput | None:
    """What the runner constrains decoding to, for a ``response_format``."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutput(kind="json_object")
    schema = json.dumps(response_format.json_schema.json_schema, separators=(",", ":"))
    return StructuredOutput(kind="json_schema", json_schema=schema)


def instruction(response_format: ResponseFormat | None) -> str | None:
    """What the model is told of a JSON format, in the system message (the template's own
    place for instructions): the runner constrains the answer to it, and a model that knows
    what it is writing fills it with better values. (:func:`check` it first.)"""
    if response_format is None or response_format.type == "text":
        return None
    text = "Answer with one JSON value and nothing else."
    if response_format.type == "json_schema":
        schema = json.dumps(response_format.json_schema.json_schema, separators=(",", ":"))
        text += f" It must match this JSON schema: {schema}"
    return text


def enforce(response_format: ResponseFormat | None, text: str, *, cut: int | None = None) -> str:
    """The answer as the format asks. The runner constrained it to the format (and closes it
    validly before its budget runs out, runners/closing.py), so it parses and matches; an
    answer still cut short (``cut``: the budget it ran out of, ``finish_reason`` length) is a
    422 that says so and where, never a schema mismatch read off a piece of it. A whole answer
    is checked again here anyway (``jsonschema``)."""
    if response_format is None or response_format.type == "text":
        return text
    if cut is not None and not is_json(text):
        where = cut_at(text.strip())
        raise UnprocessableError(
            f"The answer was cut by max_tokens ({cut} tokens) or the context window at {where}, "
            "before its JSON was complete. Retry with a larger max_tokens.",
            param="max_tokens",
            code="response_format_not_met",
        )
    try:
        value, as_written = json_answer(text)
    except JSONExtractionError as exc:
        raise UnprocessableError(
            f"The answer is not complete JSON ({exc}); it was most likely cut by max_tokens. "
            "Retry with a larger max_tokens.",
            param="response_format",
            code="response_format_not_met",
        ) from None
    if response_format.type == "json_schema":
        problems = validation_errors(value, response_format.json_schema.json_schema)
        if problems:
            raise UnprocessableError(
                "The answer does not match the JSON schema: " + "; ".join(problems) + ".",
                param="response_format",
                code="response_format_not_met",
            )
    elif not isinstance(value, dict):
        raise UnprocessableError(
            "The answer is not a JSON object.",
            param="response_format",
            code="response_format_not_met",
        )
    if as_written is not None:  # the constrained answer as the model wrote it (compact)
        return as_written
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
