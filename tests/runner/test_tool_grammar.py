"""The grammar tool calls are decoded under: the structural tag of ``structured_output``,
compiled by xgrammar against the tiny model's tokenizer, and the answers it accepts."""

from __future__ import annotations

import asyncio
import enum
import json
from pathlib import Path
from typing import Any

import pydantic
import pytest
import xgrammar as xgr
from transformers import AutoTokenizer

from contract.errors import EngineRequestError
from logic.protocol import ChatCompletionRequest
from logic.tools import plan_tools, structured_output
from runners.grammar import Grammars

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Part(pydantic.BaseModel):
    name: str
    colour: Colour


class Order(pydantic.BaseModel):
    parts: list[Part]


ORDER = {
    "type": "function",
    "function": {"name": "order", "parameters": Order.model_json_schema()},
}


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def grammars(tiny_tokenizer_dir: Path, tokenizer):
    grammars = Grammars(tiny_tokenizer_dir, len(tokenizer))
    yield grammars
    grammars.close()


def spec(tools: list[dict[str, Any]], *, native: bool = False, **fields: Any):
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Hi"}], "tools": tools, **fields}
    )
    plan = plan_tools(request, native=native)
    assert plan is not None
    return structured_output(plan)


@pytest.fixture(scope="module")
def accepts(grammars, tokenizer):
    """accepts(text, tools, **request fields): whether the grammar takes ``text`` as a whole
    answer, ended by EOS."""

    def accepts(text: str, tools: list[dict[str, Any]], **fields: Any) -> bool:
        matcher = xgr.GrammarMatcher(grammars.compile(spec(tools, **fields)))
        return (
            matcher.accept_string(text)
            and matcher.accept_token(tokenizer.eos_token_id)
            and matcher.is_terminated()
        )

    return accepts


def block(*calls: tuple[str, dict[str, Any]]) -> str:
    """A call block in the prompt's format (json.dumps spacing: one space after ":" and ",")."""
    items = ",\n".join(json.dumps({"name": n, "arguments": a}) for n, a in calls)
    return f"<tool_call>[\n{items}\n]</tool_call>"


def hermes(name: str, arguments: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


PARIS = ("get_weather", {"city": "Paris"})
ROME = ("get_weather", {"city": "Rome", "days": 3})


def test_the_spec_is_a_structural_tag():
    result = spec([WEATHER])
    assert result.kind == "structural_tag" and result.param == "tools"
    assert json.loads(result.structural_tag)["type"] == "structural_tag"


# ---------------------------------------------------------------- one block of calls


def test_auto_takes_plain_text(accepts):
    assert accepts("Paris is sunny today.", [WEATHER])


def test_auto_takes_text_then_a_call_block(accepts):
    assert accepts(block(PARIS), [WEATHER])
    assert accepts("Let me check.\n" + block(PARIS), [WEATHER])
    assert accepts(block(PARIS, ROME), [WEATHER])


def test_auto_ends_after_the_call_block(accepts):
    assert not accepts(block(PARIS) + "\nIt is sunny.", [WEATHER])
    assert not accepts(block(PARIS) + "\n" + block(ROME), [WEATHER])


def test_an_unknown_tool_is_refused(accepts):
    assert not accepts(block(("get_news", {"city": "Paris"})), [WEATHER, CLOCK])
    assert accepts(block(("get_time", {})), [WEATHER, CLOCK])


@pytest.mark.parametrize(
    "arguments",
    [
        {"city": "Paris", "country": "FR"},  # a property the schema does not name
        {"days": 2},  # the required one missing
        {"city": 7},  # of the wrong type
        {"city": "Paris", "days": 1.5},
    ],
)
def test_arguments_off_the_schema_are_refused(accepts, arguments):
    assert not accepts(block(("get_weather", arguments)), [WEATHER])


def test_runs_of_whitespace_are_refused(accepts):
    assert not accepts(block(PARIS).replace('"city": ', '"city":    '), [WEATHER])


def test_required_refuses_plain_text(accepts):
    assert not accepts("Paris is sunny today.", [WEATHER], tool_choice="required")
    assert not accepts("Sure.\n" + block(PARIS), [WEATHER], tool_choice="required")
    assert accepts(block(PARIS), [WEATHER], tool_choice="required")


def test_a_named_function_is_the_only_one_callable(accepts):
    named = {"tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    assert accepts(block(("get_time", {})), [WEATHER, CLOCK], **named)
    assert not accepts(block(PARIS), [WEATHER, CLOCK], **named)
    assert not accepts("It is noon.", [WEATHER, CLOCK], **named)


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_parallel_calls_share_one_block_unless_turned_off(accepts, choice):
    both = block(PARIS, ROME)
    assert accepts(both, [WEATHER], tool_choice=choice, parallel_tool_calls=True)
    assert not accepts(both, [WEATHER], tool_choice=choice, parallel_tool_calls=False)
    assert accepts(block(PARIS), [WEATHER], tool_choice=choice, parallel_tool_calls=False)


def test_pydantic_schemas_with_defs_and_enums_are_enforced(accepts):
    def call(colour: str) -> str:
        return block(("order", {"parts": [{"name": "wheel", "colour": colour}]}))

    assert "$defs" in ORDER["function"]["parameters"]
    assert accepts(call("red"), [WEATHER, ORDER], tool_choice="required")
    assert not accepts(call("green"), [WEATHER, ORDER], tool_choice="required")


def test_two_tools_defs_of_the_same_name_keep_their_own_meaning(accepts):
    def tool(name: str, values: list[str]) -> dict[str, Any]:
        parameters = {
            "$defs": {"Kind": {"enum": values}},
            "type": "object",
            "properties": {"kind": {"$ref": "#/$defs/Kind"}},
            "required": ["kind"],
        }
        return {"type": "function", "function": {"name": name, "parameters": parameters}}

    tools = [tool("paint", ["red", "blue"]), tool("ship", ["air", "sea"])]
    assert accepts(block(("paint", {"kind": "red"}), ("ship", {"kind": "sea"})), tools)
    assert not accepts(block(("paint", {"kind": "sea"})), tools)
    assert not accepts(block(("ship", {"kind": "red"})), tools)


# ---------------------------------------------------------------- Hermes blocks (native)


def test_native_required_takes_one_block_per_call(accepts):
    assert accepts(hermes(*PARIS), [WEATHER], native=True, tool_choice="required")
    assert not accepts(block(PARIS), [WEATHER], native=True, tool_choice="required")
    assert not accepts("It is sunny.", [WEATHER], native=True, tool_choice="required")
    assert not accepts("", [WEATHER], native=True, tool_choice="required")  # at least one


def test_native_parallel_calls_are_blocks_separated_by_a_newline(accepts):
    two = hermes(*PARIS) + "\n" + hermes(*ROME)
    assert accepts(two, [WEATHER], native=True, tool_choice="required")
    assert not accepts(
        two, [WEATHER], native=True, tool_choice="required", parallel_tool_calls=False
    )


def test_native_auto_takes_text_or_calls(accepts):
    assert accepts("It is sunny.", [WEATHER], native=True)
    assert accepts("Let me check.\n" + hermes(*PARIS), [WEATHER], native=True)
    assert not accepts(hermes("get_news", {"city": "Paris"}), [WEATHER], native=True)


def test_native_auto_without_parallel_calls_ends_after_the_first_block(accepts):
    one = {"native": True, "parallel_tool_calls": False}
    assert accepts("Let me check.\n" + hermes(*PARIS), [WEATHER], **one)
    assert not accepts(hermes(*PARIS) + "\n" + hermes(*ROME), [WEATHER], **one)
    assert accepts(hermes(*PARIS) + "\n" + hermes(*ROME), [WEATHER], native=True)


# ---------------------------------------------------------------- what cannot compile


LOOKBEHIND = {"type": "string", "pattern": "(?<=a)b"}
EMPTY_RANGE = {"type": "integer", "minimum": 5, "maximum": 2}


@pytest.mark.parametrize(
    ("schema", "reason"),
    [(LOOKBEHIND, "Lookbehind"), (EMPTY_RANGE, "minimum greater than maximum")],
)
def test_a_tool_schema_the_grammar_engine_cannot_compile_is_the_clients_error(
    grammars, tokenizer, schema, reason
):
    parameters = {"type": "object", "properties": {"a": schema}}
    bad = {"type": "function", "function": {"name": "bad", "parameters": parameters}}
    with pytest.raises(EngineRequestError, match=reason) as caught:
        asyncio.run(grammars.matcher(spec([WEATHER, bad]), [tokenizer.eos_token_id]))
    assert caught.value.param == "tools" and caught.value.code == "invalid_value"
    assert ".cc:" not in str(caught.value)


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("parallel", [None, True])
def test_a_named_function_is_called_exactly_once(accepts, native, parallel):
    # As OpenAI's API answers: parallel_tool_calls counts for auto and required only.
    named = {"tool_choice": {"type": "function", "function": {"name": "get_weather"}},
             "parallel_tool_calls": parallel, "native": native}  # fmt: skip
    one = hermes(*PARIS) if native else block(PARIS)
    two = f"{hermes(*PARIS)}\n{hermes(*ROME)}" if native else block(PARIS, ROME)
    assert accepts(one, [WEATHER, CLOCK], **named)
    assert not accepts(two, [WEATHER, CLOCK], **named)
    # (required still takes several, unless parallel_tool_calls is false)
    assert accepts(two, [WEATHER, CLOCK], tool_choice="required", native=native)
