"""JSON in model answers: finding the value, and checking it against a JSON Schema.

:func:`extract_json` accepts what models write when asked for JSON: the bare value, a
fenced ```json block, or a value embedded in prose. The runner constrains decoding to the
schema, so an answer that ran to its end is the bare value already; a cut one is not.
:func:`schema_errors` and :func:`validation_errors` are the ``jsonschema`` library's checks
(the schema's own dialect, ``$defs``/``$ref`` and formats included), worded for a client.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import referencing
import referencing.exceptions

# ---------------------------------------------------------------- extraction


class JSONExtractionError(ValueError):
    """The text holds no JSON value that parses."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Strict JSON: NaN and Infinity, which Python's json accepts, are refused.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_NOTHING = object()  # "no value found", since null is a value
_FENCE = "```"
_OPENING = re.compile(r"[{\[]")
# Brackets tried as the start of an embedded value: bounds the work on pathological text.
MAX_EMBEDDED_ATTEMPTS = 100


def extract_json(text: str) -> Any:
    """The JSON value in a model's answer.

    Tried in order: the whole text; each fenced code block (```json or plain), in order;
    then the first ``{`` or ``[`` in the text where a complete JSON value starts (among the
    first :data:`MAX_EMBEDDED_ATTEMPTS`). NaN and Infinity are not JSON here. Raises
    :class:`JSONExtractionError` when none parses.
    """
    return json_answer(text)[0]


def json_answer(text: str) -> tuple[Any, str | None]:
    """:func:`extract_json`'s value, and the answer's own text of it when the whole answer
    (stripped) is that value, else None (it was found in a fence or in prose)."""
    whole = text.strip()
    value = _loads(whole)
    if value is not _NOTHING:
        return value, whole
    for block in _fenced_blocks(text):
        value = _loads(block.strip())
        if value is not _NOTHING:
            return value, None
    value = _first_embedded(text)
    if value is not _NOTHING:
        return value, None
    raise JSONExtractionError("The answer holds no valid JSON value.")


def is_json(text: str) -> bool:
    """The whole text (stripped) is one JSON value."""
    return _loads(text.strip()) is not _NOTHING


def cut_at(text: str) -> str:
    """Where JSON text cut short stops: the path of the value it was writing, ``$`` for the
    top (``$.triples[3].relation``). Text that is not JSON gives what it can."""
    frames: list[list[Any]] = []  # ["{", key or None] or ["[", index]
    in_string = escaped = False
    start = 0
    last_string = ""
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
                last_string = text[start : i + 1]
            continue
        if char == '"':
            in_string, start = True, i
        elif char == "{":
            frames.append(["{", None])
        elif char == "[":
            frames.append(["[", 0])
        elif char in "}]" and frames:
            frames.pop()
        elif char == ":" and frames and frames[-1][0] == "{":
            try:
                frames[-1][1] = json.loads(last_string)
            except ValueError:
                frames[-1][1] = last_string
        elif char == "," and frames:
            if frames[-1][0] == "[":
                frames[-1][1] += 1
            else:
                frames[-1][1] = None
    return _where([frame[1] for frame in frames if frame[1] is not None or frame[0] == "["])


def _loads(text: str) -> Any:
    if not text:
        return _NOTHING
    try:
        value, end = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):
        return _NOTHING
    return value if end == len(text) else _NOTHING


def _fenced_blocks(text: str) -> list[str]:
    """The contents of ``` fences, without the info string (```json)."""
    blocks = []
    start = text.find(_FENCE)
    while start != -1:
        body = text.find("\n", start + len(_FENCE))
        if body == -1:
            break
        end = text.find(_FENCE, body)
        if end == -1:  # an unclosed fence: the answer was cut off
            blocks.append(text[body + 1 :])
            break
        blocks.append(text[body + 1 : end])
        start = text.find(_FENCE, end + len(_FENCE))
    return blocks


def _first_embedded(text: str) -> Any:
    """The first object or array that parses, starting at one of the first
    :data:`MAX_EMBEDDED_ATTEMPTS` brackets (each attempt may scan to the end of the text)."""
    for n, opening in enumerate(_OPENING.finditer(text)):
        if n == MAX_EMBEDDED_ATTEMPTS:
            break
        try:
            value, _ = _DECODER.raw_decode(text, opening.start())
        except (ValueError, RecursionError):
            continue
        return value
    return _NOTHING


# ---------------------------------------------------------------- schemas

TYPE_NAMES = frozenset({"null", "boolean", "integer", "number", "string", "array", "object"})
_SIZES = ("minLength", "maxLength", "minItems", "maxItems")


def _validator_class(schema: Any) -> type:
    return jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)


def schema_errors(schema: Any) -> list[str]:
    """Why ``schema`` is not a valid JSON Schema (empty when it is). A ``$ref`` must point
    inside the schema (``#...``): the service fetches nothing a client names."""
    if not isinstance(schema, dict | bool):
        return ["the schema must be an object"]
    try:
        _validator_class(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(part) for part in exc.path) or "the schema"
        return [f"at {where}: {exc.message}"]
    except RecursionError:
        return ["the schema is nested too deeply"]
    remote = _remote_ref(schema)
    if remote is not None:
        return [f"only references inside the schema ('#/...') are allowed, not {remote!r}"]
    return []


def _remote_ref(schema: Any, depth: int = 0) -> str | None:
    """The first ``$ref`` that does not point inside the schema."""
    if depth > 200:
        return None
    if isinstance(schema, list):
        items = schema
    elif isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return ref
        items = list(schema.values())
    else:
        return None
    for item in items:
        found = _remote_ref(item, depth + 1)
        if found is not None:
            return found
    return None


# An empty registry that retrieves nothing: a reference is resolved inside the schema or not
# at all (jsonschema's default would fetch http:// and file:// URLs).
_NO_RETRIEVAL = referencing.Registry()


def validation_errors(value: Any, schema: dict[str, Any] | bool, limit: int = 5) -> list[str]:
    """Where ``value`` breaks ``schema``, at most ``limit`` of them (empty when it conforms)."""
    validator = _validator_class(schema)(
        schema, format_checker=jsonschema.FormatChecker(), registry=_NO_RETRIEVAL
    )
    try:
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    except referencing.exceptions.Unresolvable as exc:
        return [f"the schema's reference {getattr(exc, 'ref', '')!r} cannot be resolved"]
    return [f"{_where(e.absolute_path)}: {e.message}" for e in errors[:limit]]


def _where(path: Any) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out
