"""Constrained answers closed within their budget (runners/closing.py): the way to the end is
valid from any point of an answer, the guard closes at the last step that fits and never
earlier, an answer that ends by itself is untouched, and loops are closed where they repeat."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest
import xgrammar as xgr
from transformers import AutoTokenizer

from contract.tokens import SamplingParams, StructuredOutput
from runners.closing import Repeats
from runners.engine import GenerationEngine
from runners.grammar import Grammars
from runners.settings import ClosingOptions
from tests.runner.test_engine import DEVICE
from tests.runner.test_engine_structured import EOS

ON = ClosingOptions(close=True, loop_tokens=0)
OFF = ClosingOptions(close=False, loop_tokens=0)

TRIPLES = {
    "type": "object",
    "properties": {
        "triples": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "subject": {"type": "string"},
                    "relation": {"type": "string"},
                    "object": {"type": "string"},
                },
                "required": ["subject", "relation", "object"],
            },
        }
    },
    "required": ["triples"],
}
# Bounds and choices the way must keep: a minimum, a minimum length, a pattern, enums, an
# optional field, items still owed (minItems), nesting.
STRICT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 3},
        "age": {"type": "integer", "minimum": 18, "maximum": 120},
        "nick": {"type": "string"},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "minItems": 2},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "boss": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "level": {"type": "number"}},
            "required": ["name", "level"],
        },
    },
    "required": ["name", "age", "tags", "code", "boss"],
}
EXAMPLES = [
    (TRIPLES, {"triples": [{"subject": "Marie Curie", "relation": "born in", "object": "Warsaw"},
                           {"subject": "Marie Curie", "relation": "won", "object": "Nobel"}]}),
    (STRICT, {"name": "Anna", "age": 34, "nick": "An", "tags": ["red", "blue", "red"],
              "code": "ABC", "boss": {"name": "Bo", "level": 2.5}}),
    (None, {"a \\\" b": [1, {"c": None}], "d": "x"}),
]  # fmt: skip


@pytest.fixture(scope="module")
def grammars(tiny_model_dir: Path):
    grammars = Grammars(tiny_model_dir, AutoTokenizer.from_pretrained(tiny_model_dir).vocab_size)
    yield grammars
    grammars.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def spec(schema: dict | None) -> StructuredOutput:
    if schema is None:
        return StructuredOutput(kind="json_object")
    return StructuredOutput(kind="json_schema", json_schema=json.dumps(schema))


def matcher(grammars: Grammars, schema: dict | None) -> xgr.GrammarMatcher:
    return asyncio.run(grammars.matcher(spec(schema), [EOS])).matcher


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([i for i in ids if i != EOS])


@pytest.mark.parametrize("example", range(len(EXAMPLES)))
def test_the_way_to_the_end_is_valid_from_every_point_of_an_answer(grammars, tokenizer, example):
    schema, value = EXAMPLES[example]
    ids = tokenizer.encode(json.dumps(value, separators=(",", ":")))
    grammars.guard_on(asyncio.run(grammars.matcher(spec(schema), [EOS])), budget=1, options=ON)
    search = grammars._search
    for cut in range(len(ids)):
        state = matcher(grammars, schema)
        for token in ids[:cut]:
            assert state.accept_token(token)
        way = search.way(state, limit=200)
        assert way is not None and way[-1] == EOS, cut
        closed = json.loads(text_of(tokenizer, ids[:cut] + way))
        if schema is not None:
            jsonschema.validate(closed, schema)
        else:
            assert isinstance(closed, dict)


def test_a_way_longer_than_the_limit_is_not_given(grammars):
    state = matcher(grammars, STRICT)
    assert grammars._search.way(state.fork(), limit=3) is None  # the smallest answer is longer
    assert grammars._search.way(state, limit=300) is not None


def endless(tokenizer) -> list[int]:
    """An answer that never ends by itself: one triple after another."""
    item = '{"subject":"Marie Curie","relation":"subject","object":"Marie Curie"},'
    return tokenizer.encode('{"triples":[' + item * 40)


@pytest.mark.parametrize("budget", [30, 61, 120, 251])
def test_the_guard_closes_at_the_last_step_that_fits(grammars, tokenizer, budget):
    state = matcher(grammars, TRIPLES)
    guard = grammars.guard_on(_constraint(state), budget=budget, options=ON)
    kept: list[int] = []
    for token in endless(tokenizer)[:budget]:  # the engine ends it there
        verdict = guard.step(token)
        assert verdict.accepted
        if verdict.keep:
            kept.append(token)
        if verdict.way is not None:
            assert verdict.why == "budget"
            answer = kept + verdict.way
            break
    else:
        pytest.fail("not closed within the budget")
    assert len(answer) <= budget
    jsonschema.validate(json.loads(text_of(tokenizer, answer)), TRIPLES)
    # Not earlier than it had to: one more token of the model's would leave no way that fits.
    later = matcher(grammars, TRIPLES)
    for token in endless(tokenizer)[: len(kept) + 1]:
        assert later.accept_token(token)
    way = grammars._search.way(later, limit=budget)
    assert way is None or len(kept) + 1 + len(way) > budget


def test_an_answer_that_ends_by_itself_goes_through_untouched(grammars, tokenizer):
    ids = tokenizer.encode(json.dumps(EXAMPLES[0][1], separators=(",", ":"))) + [EOS]
    guard = grammars.guard_on(_constraint(matcher(grammars, TRIPLES)), budget=len(ids),
                              options=ClosingOptions(close=True, loop_tokens=8))  # fmt: skip
    verdicts = [guard.step(token) for token in ids]
    assert all(v.accepted and v.keep and v.way is None for v in verdicts)


def test_with_the_guard_off_an_endless_answer_runs_to_its_cut(grammars, tokenizer):
    guard = grammars.guard_on(_constraint(matcher(grammars, TRIPLES)), budget=30, options=OFF)
    assert all(guard.step(t).way is None for t in endless(tokenizer)[:30])


def test_a_loop_is_closed_where_it_repeats(grammars, tokenizer):
    options = ClosingOptions(close=False, loop_tokens=24)
    guard = grammars.guard_on(_constraint(matcher(grammars, TRIPLES)), budget=1000,
                              options=options)  # fmt: skip
    kept = []
    for token in endless(tokenizer):
        verdict = guard.step(token)
        kept.append(token)
        if verdict.way is not None:
            assert verdict.why == "loop"
            break
    item_tokens = len(tokenizer.encode('{"subject":"Marie Curie","relation":"subject",'
                                       '"object":"Marie Curie"},'))  # fmt: skip
    assert len(kept) < 5 * item_tokens  # the third copy, not the fortieth
    value = json.loads(text_of(tokenizer, kept + verdict.way))
    jsonschema.validate(value, TRIPLES)


def test_repeats_needs_three_whole_periods_and_the_length():
    loops = Repeats(min_tokens=8)
    assert not any(loops.push(t) for t in range(100))  # nothing repeats
    loops = Repeats(min_tokens=8)
    seen = [loops.push(t) for t in [1, 2, 3] * 4]  # period 3: the third copy's last token
    assert seen.index(True) == 8
    loops = Repeats(min_tokens=12)  # ... and 12 tokens in all
    assert [loops.push(t) for t in [1, 2, 3] * 4].index(True) == 11
    loops = Repeats(min_tokens=8)  # an item written twice, then the end: an answer
    assert not any(loops.push(t) for t in [9, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 0, 11])


def _constraint(state: xgr.GrammarMatcher):
    from runners.grammar import Constraint

    return Constraint(state, [])


# ---------------------------------------------------------------- in the engine


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path):
    on = GenerationEngine.load(tiny_model_dir, device=DEVICE, dtype="float32", closing=ON)
    off = GenerationEngine.load(tiny_model_dir, device=DEVICE, dtype="float32", closing=OFF)
    yield on, off
    on.close()
    off.close()


async def answer(engine, params) -> tuple[list[int], str | None, str | None, list | None]:
    ids, finish, closed, logprobs = [], None, None, []
    async for chunk in engine.stream([1, 60, 61, 62], params):
        ids += chunk.token_ids
        finish, closed = chunk.finish_reason, chunk.closed or closed
        logprobs = None if chunk.logprobs is None else (logprobs or []) + chunk.logprobs
    return ids, finish, closed, logprobs


def test_the_engine_closes_what_a_random_model_would_leave_cut(engines, tokenizer):
    on, off = engines
    unbounded = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    cut = 0
    for seed in range(6):
        params = SamplingParams(
            max_new_tokens=24, stop_token_ids=[EOS], temperature=1.0, seed=seed,
            structured=spec(unbounded), logprobs=True,
        )  # fmt: skip
        ids, finish, closed, logprobs = asyncio.run(answer(on, params))
        plain, plain_finish, _, _ = asyncio.run(answer(off, params))
        assert len(ids) <= 24 and finish == "stop"
        jsonschema.validate(json.loads(text_of(tokenizer, ids)), unbounded)
        assert logprobs is not None and len(logprobs) == len(ids)
        if plain_finish == "length":
            cut += 1
            assert closed == "budget"
            # What it kept is what the model wrote; the closing tokens (logprob 0) follow.
            closing = next(i for i, lp in enumerate(reversed(logprobs)) if lp.logprob != 0.0)
            kept = len(ids) - closing
            assert closing >= 1 and ids[:kept] == plain[:kept]
        else:
            assert (ids, closed) == (plain, None)  # it ended by itself: byte-identical
    assert cut, "a random model never ran out of 24 tokens: the test proves nothing"
    assert on.stats.closed_budget == cut and off.stats.closed_budget == 0


def test_answers_that_finish_are_identical_with_the_guard_on_and_off(engines):
    on, off = engines
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for seed in range(4):
        params = SamplingParams(
            max_new_tokens=50, stop_token_ids=[EOS], temperature=1.0, seed=seed,
            structured=spec(schema),
        )  # fmt: skip
        assert asyncio.run(answer(on, params))[:3] == asyncio.run(answer(off, params))[:3]
