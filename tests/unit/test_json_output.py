"""Finding JSON in model answers, and checking it against a JSON Schema subset."""

from __future__ import annotations

import time

import pytest

from logic.json_output import (
    JSONExtractionError,
    extract_json,
    schema_problems,
    unsupported_keywords,
    validate_json,
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
    assert validate_json({"name": "Ada", "age": 36, "tags": ["math"]}, PERSON) == []


@pytest.mark.parametrize(
    ("type_", "good", "bad", "message"),
    [
        ("object", {}, [], "$: expected object, got array"),
        ("array", [], {}, "$: expected array, got object"),
        ("string", "x", 1, "$: expected string, got integer"),
        ("number", 1.5, "1.5", "$: expected number, got string"),
        ("number", 2, True, "$: expected number, got boolean"),
        ("integer", 2, 2.5, "$: expected integer, got number"),
        ("integer", 2.0, False, "$: expected integer, got boolean"),
        ("boolean", False, 0, "$: expected boolean, got integer"),
        ("null", None, "", "$: expected null, got string"),
        (["string", "null"], None, 3, "$: expected string or null, got integer"),
    ],
)
def test_type(type_: object, good: object, bad: object, message: str):
    assert validate_json(good, {"type": type_}) == []
    assert validate_json(bad, {"type": type_}) == [message]


def test_properties_are_checked_by_path():
    schema = {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"name": {"type": "string"}}},
            }
        },
    }
    value = {"items": [{"name": "a"}, {"name": "b"}, {"name": 3}]}
    assert validate_json(value, schema) == ["$.items[2].name: expected string, got integer"]


def test_property_names_that_are_not_identifiers_are_quoted():
    schema = {"properties": {"first name": {"type": "string"}}}
    assert validate_json({"first name": 1}, schema) == [
        '$["first name"]: expected string, got integer'
    ]


def test_required():
    assert validate_json({"name": "Ada"}, PERSON) == ["$.age: required property is missing"]


def test_additional_properties():
    value = {"name": "Ada", "age": 36, "email": "a@b.c"}
    assert validate_json(value, PERSON) == [
        "$.email: property is not allowed (additionalProperties)"
    ]
    assert validate_json(value, {**PERSON, "additionalProperties": True}) == []
    typed_extras = {"additionalProperties": {"type": "integer"}}
    assert validate_json({"n": "x"}, typed_extras) == ["$.n: expected integer, got string"]


def test_items():
    schema = {"type": "array", "items": {"type": "integer"}}
    assert validate_json([1, 2, 3], schema) == []
    assert validate_json([1, "2", None], schema) == [
        "$[1]: expected integer, got string",
        "$[2]: expected integer, got null",
    ]


def test_enum():
    schema = {"enum": ["red", "green", 1]}
    assert validate_json("red", schema) == []
    assert validate_json(1.0, schema) == []  # 1 == 1.0 in JSON
    assert validate_json("blue", schema) == ['$: "blue" is not one of "red", "green", 1']
    assert validate_json(True, {"enum": [1]}) == ["$: true is not one of 1"]


def test_const():
    assert validate_json({"a": [1]}, {"const": {"a": [1]}}) == []
    assert validate_json(False, {"const": 0}) == ["$: expected 0, got false"]
    assert validate_json([1, 2], {"const": [1]}) == ["$: expected [1], got [1, 2]"]


def test_min_and_max_length():
    schema = {"type": "string", "minLength": 2, "maxLength": 3}
    assert validate_json("abc", schema) == []
    assert validate_json("a", schema) == ["$: has 1 characters, fewer than the minimum 2"]
    assert validate_json("abcd", schema) == ["$: has 4 characters, more than the maximum 3"]
    assert validate_json(12345, schema) == ["$: expected string, got integer"]


def test_minimum_and_maximum():
    schema = {"minimum": 0, "maximum": 10.5}
    assert validate_json(0, schema) == []
    assert validate_json(10.5, schema) == []
    assert validate_json(-1, schema) == ["$: -1 is less than the minimum 0"]
    assert validate_json(11, schema) == ["$: 11 is greater than the maximum 10.5"]
    assert validate_json("11", schema) == []  # bounds apply to numbers only


def test_min_and_max_items():
    schema = {"minItems": 1, "maxItems": 2}
    assert validate_json([1], schema) == []
    assert validate_json([], schema) == ["$: has 0 items, fewer than the minimum 1"]
    assert validate_json([1, 2, 3], schema) == ["$: has 3 items, more than the maximum 2"]


def test_any_of():
    schema = {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "integer"}]}
    assert validate_json("ab", schema) == []
    assert validate_json(7, schema) == []
    assert validate_json({"x": "abc"}, {"properties": {"x": schema}}) == [
        "$.x: matches none of the anyOf schemas ($.x: has 3 characters, more than the "
        "maximum 2; $.x: expected integer, got string)"
    ]


def test_boolean_schemas():
    assert validate_json({"anything": 1}, True) == []
    assert validate_json({"a": 1}, {"properties": {"a": False}}) == [
        "$.a: no value is allowed here"
    ]


def test_every_violation_is_reported():
    value = {"name": "", "age": -1, "tags": ["ok", 2], "x": 0}
    assert validate_json(value, PERSON) == [
        "$.name: has 0 characters, fewer than the minimum 1",
        "$.age: -1 is less than the minimum 0",
        "$.tags[1]: expected string, got integer",
        "$.x: property is not allowed (additionalProperties)",
    ]


# ---------------------------------------------------------------- schemas


def test_unsupported_keywords_are_found_anywhere_and_annotations_are_not():
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Thing",
        "description": "A thing.",
        "type": "object",
        "properties": {
            "when": {"type": "string", "format": "date-time"},
            "list": {"type": "array", "items": {"pattern": "^a", "default": "a"}},
            "either": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/x"}]},
            "extra": {"type": "object", "additionalProperties": {"oneOf": []}},
        },
        "$defs": {"x": {"type": "integer"}},
    }
    assert unsupported_keywords(schema) == {"format", "pattern", "$ref", "oneOf", "$defs"}
    assert unsupported_keywords(PERSON) == set()
    assert unsupported_keywords({"items": [{"type": "string"}]}) == {"items"}
    assert unsupported_keywords(True) == set()


def test_unsupported_keywords_are_ignored_by_validation():
    assert validate_json("abc", {"type": "string", "pattern": "^z"}) == []


def test_schema_problems():
    assert schema_problems(PERSON) == []
    assert schema_problems(True) == []
    bad = {
        "type": "strng",
        "minLength": -1,
        "maximum": "10",
        "required": "name",
        "properties": {"a": {"type": ["string", 3]}, "b": 5},
        "anyOf": [],
    }
    assert schema_problems(bad) == [
        "$.type: must be one of array, boolean, integer, null, number, object, string",
        "$.minLength: must be a non-negative integer",
        "$.maximum: must be a number",
        "$.required: must be an array of strings",
        "$.anyOf: must be a non-empty array",
        "$.properties.a.type: must be one of array, boolean, integer, null, number, object, string",
        "$.properties.b: a schema must be an object or a boolean",
    ]
