"""Structured outputs on the native engine (tiny random Llama): whatever a random model
would write, the answer parses and matches its schema."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest
from transformers import AutoTokenizer

from contract.errors import EngineRequestError
from contract.tokens import SamplingParams, StructuredOutput
from runners.engine import GenerationEngine
from tests.runner.test_engine import DEVICE, collect

EOS = 2  # the tiny model's <|im_end|>
# Bounded, so a random model must finish: strings by maxLength, arrays by maxItems,
# numbers by their ranges. ($defs/$ref, enums, const, anyOf, nesting, optional fields.)
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "colour": {"enum": ["red", "green", "blue"]},
        },
        "required": ["name", "age", "colour"],
    },
    {
        "$defs": {
            "Part": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 99},
                    "kind": {"const": "bolt"},
                },  # fmt: skip
                "required": ["id", "kind"],
            }
        },
        "type": "object",
        "properties": {
            "parts": {"type": "array", "items": {"$ref": "#/$defs/Part"}, "maxItems": 3},
            "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]},
        },
        "required": ["parts"],
    },
    {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "maxItems": 4},
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    engine = GenerationEngine.load(tiny_model_dir, device=DEVICE, dtype="float32")
    yield engine
    engine.close()


def constrained(schema: dict | None, max_new_tokens: int = 200, **options) -> SamplingParams:
    spec = (
        StructuredOutput(kind="json_schema", json_schema=json.dumps(schema))
        if schema is not None
        else StructuredOutput(kind="json_object")
    )
    return SamplingParams(
        max_new_tokens=max_new_tokens, stop_token_ids=[EOS], structured=spec, **options
    )


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_every_answer_parses_and_matches_its_schema(engine, tiny_model_dir, index):
    schema = SCHEMAS[index]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    special = set(tokenizer.all_special_ids)
    for seed in range(4):
        params = constrained(schema, temperature=1.0, seed=seed)
        ids, finish = asyncio.run(collect(engine, [1, 60, 61, 62], params))
        assert finish == "stop" and ids[-1] == EOS, (seed, tokenizer.decode(ids))
        assert not special & set(ids[:-1])  # no special token inside the JSON
        text = tokenizer.decode(ids[:-1])
        jsonschema.validate(json.loads(text), schema)
        assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)


def test_json_object_mode_gives_an_object(engine, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    params = constrained(None, temperature=0.0, max_new_tokens=40)
    ids, finish = asyncio.run(collect(engine, [1, 70, 71], params))
    if finish == "stop":  # a random model may open a string and not close it in 40 tokens
        assert isinstance(json.loads(tokenizer.decode(ids[:-1])), dict)
    else:
        assert tokenizer.decode(ids).startswith("{")


def test_constrained_and_free_requests_share_steps_and_free_answers_do_not_change(engine):
    free = [([1, 40, 41, 42], 20), ([1] + list(range(100, 140)), 15), ([7, 8], 12)]
    alone = [asyncio.run(collect(engine, p, SamplingParams(max_new_tokens=n, temperature=0.0)))
             for p, n in free]  # fmt: skip
    alone_constrained = asyncio.run(
        collect(engine, [1, 60], constrained(SCHEMAS[1], temperature=0.0))
    )

    async def together():
        tasks = [
            asyncio.create_task(collect(engine, [1, 60], constrained(SCHEMAS[1], temperature=0.0)))
        ]
        for prompt, n in free:
            tasks.append(asyncio.create_task(
                collect(engine, prompt, SamplingParams(max_new_tokens=n, temperature=0.0))
            ))  # fmt: skip
            await asyncio.sleep(0.003)
        return await asyncio.gather(*tasks)

    engine.stats.max_running = 0
    results = asyncio.run(together())
    assert results[1:] == alone
    assert results[0] == alone_constrained
    assert engine.stats.max_running > 1


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "string", "pattern": "(?<=a)b"}, "Lookbehind"),
        ({"$ref": "#/$defs/missing"}, "missing"),
        ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum greater than maximum"),
    ],
)
def test_a_schema_the_grammar_engine_cannot_compile_is_refused_with_its_reason(
    engine, schema, reason
):
    with pytest.raises(EngineRequestError, match=reason) as info:
        asyncio.run(collect(engine, [1, 2, 3], constrained(schema)))
    assert info.value.param == "response_format"
    assert ".cc:" not in str(info.value)  # no source locations for the client
    # The engine goes on serving.
    ids, _ = asyncio.run(collect(engine, [1, 2, 3], SamplingParams(max_new_tokens=3)))
    assert len(ids) == 3


def test_without_stop_ids_the_grammar_ends_the_answer_at_the_tokenizers_eos(engine, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = StructuredOutput(kind="json_schema", json_schema=json.dumps(SCHEMAS[1]))
    params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=5, structured=spec)
    ids, finish = asyncio.run(collect(engine, [1, 60, 61], params))
    assert finish == "stop" and ids[-1] == tokenizer.eos_token_id
    jsonschema.validate(json.loads(tokenizer.decode(ids[:-1])), SCHEMAS[1])
