"""Finding JSON in model answers, and checking it against a JSON Schema (jsonschema)."""

from __future__ import annotations

import time

import pytest

from logic.json_output import (
    JSONExtractionError,
    extract_json,
    schema_errors,
    validation_errors,
)

# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a": 1}', {"a": 1}),
        ("  \n[1, 2]\n", [1, 2]),
        ("42", 42),
        ('"hi"', "hi"),
        ("null", None),
        ('Sure!\n```json\n{"a": [1, 2]}\n```\nAnything else?', {"a": [1, 2]}),
        ('```\n{"plain": true}\n```', {"plain": True}),
        ('```json\n{"cut": "off"}', {"cut": "off"}),  # an unclosed fence
        ('```python\nprint(1)\n```\n```json\n{"second": 2}\n```', {"second": 2}),
        ('Here it is: {"a": {"b": "}"}} -- and {"c": 1}', {"a": {"b": "}"}}),
        ('Result: [1, {"a": 2}] done.', [1, {"a": 2}]),
        ('A {placeholder} then {"real": 1}', {"real": 1}),
        ('The {"a": 1 broken, then [2, 3]', [2, 3]),
    ],
)
def test_extract_json_finds_the_value(text: str, value: object):
    assert extract_json(text) == value


@pytest.mark.parametrize(
    "text",
    ["", "No JSON here.", "{not: json}", '{"a": 1', "NaN", '{"a": NaN}', "```json\n{bad}\n```"],
)
def test_extract_json_raises_a_value_error_when_nothing_parses(text: str):
    with pytest.raises(JSONExtractionError, match="no valid JSON") as caught:
        extract_json(text)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        "{" * 100_000,
        "[1," * 33_000,
        '{"a":' * 20_000,
        "```\n" * 25_000,
        "[" * 99 + "1," * 50_000,
    ],
)
def test_extract_json_is_fast_on_pathological_text(text: str):
    started = time.perf_counter()
    with pytest.raises(JSONExtractionError):
        extract_json(text)
    assert time.perf_counter() - started < 1.0


# ---------------------------------------------------------------- validation

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_a_conforming_value_has_no_violations():
    assert validation_errors({"name": "Ada", "age": 36, "tags": ["math"]}, PERSON) == []


def test_violations_are_reported_by_path():
    errors = validation_errors({"name": 3, "age": -1, "tags": [1], "x": 0}, PERSON)
    assert errors == [
        "$: Additional properties are not allowed ('x' was unexpected)",
        "$.age: -1 is less than the minimum of 0",
        "$.name: 3 is not of type 'string'",
        "$.tags[0]: 1 is not of type 'string'",
    ]
    assert validation_errors({}, PERSON) == [
        "$: 'name' is a required property",
        "$: 'age' is a required property",
    ]


def test_what_pydantic_writes_is_understood_refs_and_enums_included():
    """``$defs``/``$ref`` and enums: the schemas of nested pydantic models."""
    import enum

    import pydantic

    class Colour(enum.Enum):
        RED = "red"
        BLUE = "blue"

    class Part(pydantic.BaseModel):
        name: str
        colour: Colour

    class Order(pydantic.BaseModel):
        parts: list[Part]
        quantity: int = pydantic.Field(ge=1, le=10)

    schema = Order.model_json_schema()
    assert "$defs" in schema and schema_errors(schema) == []
    good = {"parts": [{"name": "wheel", "colour": "red"}], "quantity": 2}
    assert validation_errors(good, schema) == []
    bad = {"parts": [{"name": "wheel", "colour": "green"}], "quantity": 11}
    assert validation_errors(bad, schema) == [
        "$.parts[0].colour: 'green' is not one of ['red', 'blue']",
        "$.quantity: 11 is greater than the maximum of 10",
    ]


def test_schema_errors_name_the_problem():
    assert schema_errors(PERSON) == [] and schema_errors(True) == []
    assert schema_errors({"type": "strng"})[0].startswith("at type: 'strng' is not valid")
    assert schema_errors({"properties": {"a": {"minLength": -1}}})[0].startswith(
        "at properties/a/minLength: -1 is less than the minimum of 0"
    )
    assert schema_errors(["not", "a", "schema"]) == ["the schema must be an object"]
