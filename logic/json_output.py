"""JSON in model answers: finding the value, and checking it against a JSON Schema subset.

:func:`extract_json` accepts what models write when asked for JSON: the bare value, a
fenced ```json block, or a value embedded in prose. :func:`validate_json` checks a value
against the subset of JSON Schema listed in :data:`SUPPORTED_KEYWORDS`, without third-party
packages; :func:`unsupported_keywords` names what a schema uses beyond it, so the API can
refuse such a schema instead of silently not enforcing part of it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

SUPPORTED_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "minItems",
        "maxItems",
        "anyOf",
    }
)
# Annotations: they describe, never constrain, so ignoring them loses nothing.
ANNOTATION_KEYWORDS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$schema",
        "$id",
        "$comment",
    }
)

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
    value = _loads(text.strip())
    if value is not _NOTHING:
        return value
    for block in _fenced_blocks(text):
        value = _loads(block.strip())
        if value is not _NOTHING:
            return value
    value = _first_embedded(text)
    if value is not _NOTHING:
        return value
    raise JSONExtractionError("The answer holds no valid JSON value.")


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


def unsupported_keywords(schema: Any) -> set[str]:
    """Keywords used anywhere in ``schema`` that :func:`validate_json` would not enforce.

    Annotations (title, description, ...) are not counted. Array-form ``items`` (tuple
    validation) is reported as ``items``.
    """
    found: set[str] = set()
    _collect_unsupported(schema, found)
    return found


def _collect_unsupported(schema: Any, found: set[str]) -> None:
    if not isinstance(schema, dict):
        return
    found.update(k for k in schema if k not in SUPPORTED_KEYWORDS | ANNOTATION_KEYWORDS)
    if isinstance(schema.get("items"), list):
        found.add("items")
    for _, sub in _subschemas(schema, "$"):
        _collect_unsupported(sub, found)


def schema_problems(schema: Any) -> list[str]:
    """Malformed values of supported keywords (``{"type": "strng"}``, ``{"minimum": "1"}``),
    each with its place in the schema; empty when :func:`validate_json` can use the schema."""
    problems: list[str] = []
    _check_schema(schema, "$", problems)
    return problems


def _check_schema(schema: Any, path: str, problems: list[str]) -> None:
    if schema is None or isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        problems.append(f"{path}: a schema must be an object or a boolean")
        return
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not names or not all(isinstance(n, str) and n in TYPE_NAMES for n in names):
            problems.append(f"{path}.type: must be one of {', '.join(sorted(TYPE_NAMES))}")
    for key in _SIZES:
        size = schema.get(key, 0)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            problems.append(f"{path}.{key}: must be a non-negative integer")
    for key in ("minimum", "maximum"):
        if key in schema and json_type(schema[key]) not in {"integer", "number"}:
            problems.append(f"{path}.{key}: must be a number")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(n, str) for n in required):
        problems.append(f"{path}.required: must be an array of strings")
    for key, kind in (("enum", list), ("properties", dict), ("anyOf", list)):
        if key in schema and not (isinstance(schema[key], kind) and schema[key]):
            what = "a non-empty array" if kind is list else "an object"
            problems.append(f"{path}.{key}: must be {what}")
    if not isinstance(schema.get("additionalProperties", True), (bool, dict)):
        problems.append(f"{path}.additionalProperties: must be a boolean or a schema")
    for sub_path, sub in _subschemas(schema, path):
        _check_schema(sub, sub_path, problems)


def _subschemas(schema: dict[str, Any], path: str) -> list[tuple[str, Any]]:
    """The schemas nested in ``schema`` that the validator uses, with their paths."""
    subs = []
    properties = schema.get("properties")
    if isinstance(properties, dict):
        subs += [(_child_path(f"{path}.properties", n), s) for n, s in properties.items()]
    if isinstance(schema.get("items"), dict):
        subs.append((f"{path}.items", schema["items"]))
    if isinstance(schema.get("additionalProperties"), dict):
        subs.append((f"{path}.additionalProperties", schema["additionalProperties"]))
    if isinstance(schema.get("anyOf"), list):
        subs += [(f"{path}.anyOf[{i}]", s) for i, s in enumerate(schema["anyOf"])]
    return subs


# ---------------------------------------------------------------- validation


def validate_json(value: Any, schema: dict[str, Any] | bool) -> list[str]:
    """Human-readable violations of ``schema`` by ``value``, each starting with the path
    of the offending value (``$.items[2].name: expected string, got integer``); empty when
    the value conforms. Keywords outside :data:`SUPPORTED_KEYWORDS` are ignored (see
    :func:`unsupported_keywords`); a schema should pass :func:`schema_problems` first.
    """
    errors: list[str] = []
    _validate(value, schema, "$", errors)
    return errors


def json_type(value: Any) -> str:
    """The JSON type name of a Python value from ``json.loads``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_type(value: Any, name: str) -> bool:
    actual = json_type(value)
    if name == "number":
        return actual in {"integer", "number"}
    if name == "integer":  # JSON Schema: 1.0 is an integer
        return actual == "integer" or (
            actual == "number" and math.isfinite(value) and value.is_integer()
        )
    return actual == name


def _validate(value: Any, schema: Any, path: str, errors: list[str]) -> None:
    if schema is False:
        errors.append(f"{path}: no value is allowed here")
        return
    if not isinstance(schema, dict):  # True (anything) or not a schema
        return
    actual = json_type(value)
    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, name) for name in allowed):
            expected = " or ".join(str(name) for name in allowed)
            errors.append(f"{path}: expected {expected}, got {actual}")
    if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
        options = ", ".join(_show(option) for option in schema["enum"])
        errors.append(f"{path}: {_show(value)} is not one of {options}")
    if "const" in schema and not _same(value, schema["const"]):
        errors.append(f"{path}: expected {_show(schema['const'])}, got {_show(value)}")

    if actual == "string":
        _check_size(len(value), schema, "minLength", "maxLength", "characters", path, errors)
    elif actual in {"integer", "number"}:
        _check_number(value, schema, path, errors)
    elif actual == "array":
        _check_size(len(value), schema, "minItems", "maxItems", "items", path, errors)
        if isinstance(schema.get("items"), (dict, bool)):
            for i, item in enumerate(value):
                _validate(item, schema["items"], f"{path}[{i}]", errors)
    elif actual == "object":
        _check_object(value, schema, path, errors)

    if isinstance(schema.get("anyOf"), list):
        _check_any_of(value, schema["anyOf"], path, errors)


def _check_size(
    size: int, schema: dict, low: str, high: str, unit: str, path: str, errors: list[str]
) -> None:
    if low in schema and size < schema[low]:
        errors.append(f"{path}: has {size} {unit}, fewer than the minimum {schema[low]}")
    if high in schema and size > schema[high]:
        errors.append(f"{path}: has {size} {unit}, more than the maximum {schema[high]}")


def _check_number(value: float, schema: dict, path: str, errors: list[str]) -> None:
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {_show(value)} is less than the minimum {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: {_show(value)} is greater than the maximum {schema['maximum']}")


def _check_object(value: dict, schema: dict, path: str, errors: list[str]) -> None:
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    for name in schema.get("required") or []:
        if name not in value:
            errors.append(f"{_child_path(path, name)}: required property is missing")
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        item_path = _child_path(path, name)
        if name in properties:
            _validate(item, properties[name], item_path, errors)
        elif extra is False:
            errors.append(f"{item_path}: property is not allowed (additionalProperties)")
        else:
            _validate(item, extra, item_path, errors)


def _check_any_of(value: Any, options: list, path: str, errors: list[str]) -> None:
    reasons = []
    for option in options:
        found: list[str] = []
        _validate(value, option, path, found)
        if not found:
            return
        reasons.append(found[0])
    errors.append(f"{path}: matches none of the anyOf schemas ({'; '.join(reasons)})")


def _child_path(path: str, name: str) -> str:
    """``$.user`` for identifiers, ``$["first name"]`` for any other property name."""
    return f"{path}.{name}" if name.isidentifier() else f"{path}[{json.dumps(name)}]"


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true != 1 and "1" != 1."""
    ta, tb = json_type(a), json_type(b)
    numbers = {"integer", "number"}
    if ta in numbers and tb in numbers:
        return a == b
    if ta != tb:
        return False
    if ta == "array":
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if ta == "object":
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _show(value: Any) -> str:
    """A value as JSON, shortened for messages."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
