"""Tool calling on the real model through `bentoml serve`, as clients use it: the openai SDK
(every ``tool_choice``, ``parallel_tool_calls``, a history with tool results, streamed calls
reassembled) and LangChain's ``ChatOpenAI`` (``bind_tools``, ``with_structured_output``).
Every call names an offered tool and its arguments validate against that tool's schema.

The default model (135M) rarely chooses a call by itself under ``auto``; ``required`` and
named choices always call. The auto tests ask for the call in the question, or for none.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from contract.settings import DEFAULT_MODEL
from tests.conftest import USER_BENTOML_HOME
from tests.e2e.test_serve import default_model_in_store
from tests.served import BENTOML, ServedProcess, free_port

BUDGET = 300


class Unit(str, enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


class Place(BaseModel):
    city: str
    country: str | None = None


class Forecast(BaseModel):
    """The weather forecast for a place."""

    place: Place  # nested: $defs and $ref in the parameters
    unit: Unit  # an enum
    days: int = Field(ge=1, le=7)


def function(name: str, description: str, parameters: dict) -> dict:
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


TOOLS = [
    function(
        "get_weather",
        "Get the current weather in a city.",
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    ),
    function(
        "get_time",
        "Get the current time in a timezone.",
        {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    ),
    function("get_forecast", "A weather forecast.", Forecast.model_json_schema()),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served() -> Iterator[ServedProcess]:
    if not default_model_in_store():
        pytest.skip(f"{DEFAULT_MODEL} is not in {USER_BENTOML_HOME}: run `make model`")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update(BENTOML_HOME=USER_BENTOML_HOME, BENTOML_DO_NOT_TRACK="true")
    with ServedProcess([BENTOML, "serve", "service:ChatAPI"], port=free_port(), env=env) as served:
        yield served


@pytest.fixture(scope="module")
def client(served: ServedProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0, timeout=300)


def ask(client: openai.OpenAI, messages=QUESTION, **kwargs):
    return client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=messages,
        tools=kwargs.pop("tools", TOOLS),
        max_tokens=kwargs.pop("max_tokens", BUDGET),
        temperature=kwargs.pop("temperature", 0),
        **kwargs,
    )


def assert_valid_calls(calls, allowed: set[str]) -> None:
    """Each call names an allowed tool; its arguments are a JSON object its schema accepts."""
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "get_time"}},
     {"type": "function", "function": {"name": "get_forecast"}}],
    ids=["required", "named", "named-nested-schema"],
)  # fmt: skip
def test_required_and_named_choices_always_call_with_valid_arguments(client, choice, parallel):
    answer = ask(client, tool_choice=choice, parallel_tool_calls=parallel)
    result = answer.choices[0]
    # As OpenAI answers: "tool_calls" when the model had to call, "stop" for a named call.
    assert result.finish_reason == ("tool_calls" if choice == "required" else "stop")
    assert result.message.content is None
    allowed = set(SCHEMAS) if choice == "required" else {choice["function"]["name"]}
    assert_valid_calls(result.message.tool_calls, allowed)
    if not parallel or choice != "required":  # a named function: one call, as OpenAI's
        assert len(result.message.tool_calls) == 1
    assert answer.usage.completion_tokens < BUDGET // 2  # compact: it ends well inside


def test_sampled_calls_validate_too(client):
    for seed in range(3):
        result = ask(client, tool_choice="required", temperature=1.0, seed=seed).choices[0]
        assert_valid_calls(result.message.tool_calls, set(SCHEMAS))


def test_auto_answers_in_text_or_calls_as_the_model_chooses(client):
    hello = [{"role": "user", "content": "Hi! How are you today?"}]
    text = ask(client, hello, max_tokens=64).choices[0]
    assert text.finish_reason in ("stop", "length") and text.message.tool_calls is None
    assert text.message.content and "<tool_call>" not in text.message.content
    asked = [
        {
            "role": "user",
            "content": "Start your answer with <tool_call> and call get_weather for Paris.",
        }
    ]
    call = ask(client, asked, tool_choice="auto").choices[0]  # fmt: skip
    assert call.finish_reason == "tool_calls"
    assert_valid_calls(call.message.tool_calls, set(SCHEMAS))


def test_tool_choice_none_answers_in_text(client):
    result = ask(client, tool_choice="none").choices[0]
    assert result.finish_reason in ("stop", "length") and result.message.tool_calls is None
    assert "<tool_call>" not in result.message.content


def test_streamed_calls_reassemble_to_the_whole_answer(client):
    whole = ask(client, tool_choice="required").choices[0].message.tool_calls
    stream = ask(client, tool_choice="required", stream=True)
    calls: dict[int, dict] = {}
    finish, first_pieces = None, []
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for piece in choice.delta.tool_calls or []:
            if piece.index not in calls:  # index, id, type and name come first
                first_pieces.append(piece)
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "args": ""}
            else:
                assert piece.id is None and piece.function.name is None
            calls[piece.index]["args"] += piece.function.arguments or ""
    assert finish == "tool_calls"
    assert all(p.id and p.type == "function" and p.function.name for p in first_pieces)
    assert [(c["name"], c["args"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole
    ]


def test_a_history_with_tool_results_is_read_and_answered(client):
    first = ask(client, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = first.choices[0].message
    (call,) = message.tool_calls
    history = [
        *QUESTION,
        message.model_dump(),  # the assistant's call as the SDK returns it (nulls and all)
        {"role": "tool", "tool_call_id": call.id,
         "content": "Sunny, 24 degrees Celsius, light wind from the south."},
    ]  # fmt: skip
    answer = ask(client, history, tool_choice="none")
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content
    # The result reached the model: the prompt holds it (it grows with the result's length).
    longer = [*history[:2], {**history[2], "content": history[2]["content"] * 4}]
    grown = ask(client, longer, tool_choice="none", max_tokens=1)
    assert grown.usage.prompt_tokens > answer.usage.prompt_tokens + 20


def test_bad_tool_requests_are_400s_that_name_the_field(client):
    cases = [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [*TOOLS, TOOLS[0]]}, "tools[3].function.name"),
        ({"tools": [function("f", "", {"type": "nonsense"})]}, "tools[0].function.parameters"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, **kwargs)
        assert caught.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=QUESTION, tool_choice="required"
        )
    assert caught.value.body["param"] == "tool_choice"


# ---------------------------------------------------------------- LangChain


def test_langchain_bind_tools_and_structured_output(served):
    pytest.importorskip("langchain_openai", reason="langchain-openai is a dev dependency")
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{served.url}/v1", api_key="x", model=DEFAULT_MODEL,
        temperature=0, max_tokens=BUDGET, max_retries=0,
    )  # fmt: skip

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"It is sunny in {city}."

    question = HumanMessage("What is the weather in Paris?")
    asked = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([question])
    (call,) = asked.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    result = get_weather.invoke(call)  # a ToolMessage answering that call
    final = llm.bind_tools([get_weather]).invoke([question, asked, result])
    assert isinstance(final.content, str) and not final.tool_calls

    for method in ("json_schema", "function_calling"):
        forecast = llm.with_structured_output(Forecast, method=method).invoke(
            "Forecast three days of weather in Oslo, in celsius."
        )
        assert isinstance(forecast, Forecast)
