"""Finding JSON in model answers, and checking it against a JSON Schema (jsonschema)."""

from __future__ import annotations

import time

import pytest

from logic.errors import UnprocessableError
from logic.json_output import (
    JSONExtractionError,
    cut_at,
    extract_json,
    schema_errors,
    validation_errors,
)
from logic.protocol import JsonSchemaFormat, ResponseFormat
from logic.response_format import enforce

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


# ---------------------------------------------------------------- answers cut short


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('{"triples":[{"subject":"Marie Curie","relation":"born in","object":"Warsaw"},'
         '{"subject":"Marie Curie","relation":"subj', "$.triples[1].relation"),
        ('{"2020-01-01T12:30:00-00:00', "$"),  # inside a key: the object it belongs to
        ('{"a":[1,2,[3', "$.a[2][0]"),
        ('{"a":{"b \\" c":"}]x', '$.a.b " c'),  # quotes and brackets inside strings
        ("[", "$[0]"),
    ],
)  # fmt: skip
def test_a_cut_answer_says_where_it_was_cut(text, where):
    assert cut_at(text) == where


TRIPLES = {
    "type": "object",
    "properties": {"triples": {"type": "array", "items": {
        "type": "object",
        "properties": {"subject": {"type": "string"}, "object": {"type": "string"}},
        "required": ["subject", "object"],
    }}},
    "required": ["triples"],
}  # fmt: skip


def fmt(schema: dict) -> ResponseFormat:  # what a request holds
    return JsonSchemaFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )


def test_an_answer_cut_by_its_budget_is_reported_as_cut_never_as_a_mismatch():
    # Its first inner object parses, and does not match the root schema: that is not the news.
    cut = '{"triples":[{"subject":"Marie Curie","object":"Warsaw"},{"subject":"Mar'
    with pytest.raises(UnprocessableError) as caught:
        enforce(fmt(TRIPLES), cut, cut=300)
    message = caught.value.message
    assert "cut by max_tokens (300 tokens)" in message and "$.triples[1].subject" in message
    assert "does not match" not in message
    assert (caught.value.code, caught.value.param) == ("response_format_not_met", "max_tokens")


def test_a_whole_answer_that_does_not_match_is_a_mismatch_even_at_its_budget():
    for cut in (None, 300):
        with pytest.raises(UnprocessableError) as caught:
            enforce(fmt(TRIPLES), '{"triples":[{"subject":"A"}]}', cut=cut)
        assert "does not match the JSON schema" in caught.value.message
    # and one that matches is the answer, whatever the finish reason
    whole = '{"triples":[{"subject":"A","object":"B"}]}'
    assert enforce(fmt(TRIPLES), whole, cut=300) == whole
