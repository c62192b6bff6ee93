"""Tool calling without a model: planning a request's tools, the tool prompt, the history of
earlier calls, and splitting an answer (whole or piece by piece) into content and calls."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from logic.errors import InvalidRequestError, UnprocessableError
from logic.protocol import ChatCompletionRequest, ChatMessage
from logic.tools import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    Event,
    ToolCallParser,
    ToolPlan,
    history,
    instruction,
    plan_tools,
    structured_output,
    tool_calls,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1},
            },
            "required": ["city"],
        },
    },
}
EMAIL = {
    "type": "function",
    "function": {
        "name": "send_email",
        "parameters": {
            "type": "object",
            "properties": {"to": {"type": "string"}, "body": {"type": "string"}},
            "required": ["to", "body"],
        },
    },
}
USER = {"role": "user", "content": "What is the weather in Paris?"}


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [USER], **fields})


def plan(native: bool = False, **fields: Any) -> ToolPlan:
    result = plan_tools(request(tools=[WEATHER, EMAIL], **fields), native=native)
    assert result is not None
    return result


def refusal(**fields: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        plan_tools(request(**fields), native=False)
    assert caught.value.status_code == 400
    return caught.value


# ---------------------------------------------------------------- plan_tools


@pytest.mark.parametrize(
    "choice", ["auto", "required", {"type": "function", "function": {"name": "f"}}]
)
def test_tool_choice_without_tools_is_refused(choice):
    error = refusal(tool_choice=choice)
    assert error.param == "tool_choice" and error.code == "invalid_value"


def test_tool_choice_none_without_tools_is_allowed():
    assert plan_tools(request(tool_choice="none"), native=False) is None
    assert plan_tools(request(), native=False) is None


def test_a_named_function_that_is_not_among_the_tools_is_refused():
    error = refusal(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert error.param == "tool_choice" and "nope" in error.message


def test_duplicate_tool_names_are_refused_naming_the_second():
    error = refusal(tools=[WEATHER, EMAIL, WEATHER])
    assert error.param == "tools[2].function.name"
    assert "get_weather" in error.message


def test_a_parameters_schema_that_is_not_a_json_schema_is_refused():
    bad = {"type": "function", "function": {"name": "bad", "parameters": {"type": "nonsense"}}}
    error = refusal(tools=[WEATHER, bad])
    assert error.param == "tools[1].function.parameters"
    assert "nonsense" in error.message


def test_a_parameters_schema_for_anything_but_an_object_is_refused():
    # Arguments are a JSON object (OpenAI's rule); a scalar schema could not be parsed back.
    scalar = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    error = refusal(tools=[scalar])
    assert error.param == "tools[0].function.parameters" and "object" in error.message


def test_a_json_schema_response_format_with_tools_in_auto_mode_is_refused():
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    error = refusal(tools=[WEATHER], tool_choice="auto", response_format=response_format)
    assert error.param == "response_format" and error.code == "unsupported_parameter"


def test_a_text_response_format_goes_with_tools():
    assert plan(response_format={"type": "text"}).mode == "auto"


def test_tool_choice_none_plans_no_tools():
    assert plan_tools(request(tools=[WEATHER], tool_choice="none"), native=False) is None


def test_tools_without_tool_choice_plan_auto_and_parallel_calls():
    result = plan(native=True)
    assert (result.mode, result.parallel, result.native, result.name) == ("auto", True, True, None)
    assert [t.function.name for t in result.offered] == ["get_weather", "send_email"]


def test_parallel_tool_calls_false_plans_one_call():
    assert plan(parallel_tool_calls=False).parallel is False
    assert plan(tool_choice="required", parallel_tool_calls=True).parallel is True
    # A named function is called once, whatever parallel_tool_calls says (as OpenAI's API).
    named = {"type": "function", "function": {"name": "send_email"}}
    assert plan(tool_choice=named, parallel_tool_calls=True).parallel is False


def test_required_mode_offers_every_tool():
    result = plan(tool_choice="required")
    assert result.mode == "required" and len(result.offered) == 2


def test_a_named_function_is_the_only_one_offered():
    result = plan(tool_choice={"type": "function", "function": {"name": "send_email"}})
    assert (result.mode, result.name) == ("named", "send_email")
    assert [t.function.name for t in result.offered] == ["send_email"]
    assert len(result.tools) == 2  # the others stay known, for the history


# ---------------------------------------------------------------- the parser

# Content, then one block of two calls. The strings hold what would end the arguments, the
# array or the block if read outside a string, after an escaped quote and an escaped "\\".
CONTENT = "Let me check <tool names> first."
CALL_0 = r'{"city": "Pa}]ris \"}</tool_call>\"", "days": 2}'
CALL_1 = r'{"to": "a@b.c", "body": "C:\\dir\\"}'
ANSWER = (
    f"  {CONTENT}\n<tool_call>[\n"
    f'{{"name": "get_weather", "arguments": {CALL_0}}},\n'
    f'{{"name": "send_email", "arguments": {CALL_1}}}\n'
    "]</tool_call>\n"
)


def parse(parser: ToolCallParser, text: str, size: int) -> list[Event]:
    events: list[Event] = []
    for start in range(0, len(text), size):
        events += parser.push(text[start : start + size])
    return events + parser.close()


def content_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, ContentDelta))


def calls_of(events: list[Event]) -> list[tuple[str, str]]:
    """(name, arguments) of each call, checking each call starts before its arguments."""
    calls: list[tuple[str, str]] = []
    for event in events:
        if isinstance(event, CallStart):
            assert event.index == len(calls)
            calls.append((event.name, ""))
        elif isinstance(event, ArgumentsDelta):
            assert event.index == len(calls) - 1, "arguments before their call's start"
            name, arguments = calls[event.index]
            calls[event.index] = (name, arguments + event.text)
    return calls


def test_the_answer_splits_the_same_at_every_piece_size():
    for size in range(1, len(ANSWER) + 1):
        parser = ToolCallParser(plan())
        events = parse(parser, ANSWER, size)
        assert content_of(events) == CONTENT, size
        assert calls_of(events) == [("get_weather", CALL_0), ("send_email", CALL_1)], size
        assert [(c.name, c.arguments) for c in parser.calls] == calls_of(events)


def test_the_arguments_text_is_the_models_own_and_parses():
    parser = ToolCallParser(plan())
    parse(parser, ANSWER, len(ANSWER))
    assert json.loads(parser.calls[0].arguments) == {"city": 'Pa}]ris "}</tool_call>"', "days": 2}
    assert json.loads(parser.calls[1].arguments) == {"to": "a@b.c", "body": "C:\\dir\\"}


def test_plain_text_passes_through_trimmed():
    text = "  \nParis is the capital of France; 1 < 2 and <b>bold</b>.\n\n"
    for size in range(1, len(text) + 1):
        parser = ToolCallParser(plan())
        events = parse(parser, text, size)
        assert content_of(events) == text.strip(), size
        assert parser.calls == [] and tool_calls(parser) is None


def test_plain_text_whole_is_one_content_delta():
    parser = ToolCallParser(plan())
    assert parser.push("  Paris.  ") == [ContentDelta("Paris.")]
    assert parser.close() == []


def test_what_may_begin_a_call_is_held_back_and_given_out_at_close():
    parser = ToolCallParser(plan())
    assert parser.push("The tag is <tool_c") == [ContentDelta("The tag is")]
    assert content_of(parser.close()) == " <tool_c"


@pytest.mark.parametrize(
    "cut",
    [
        "<tool_call>",
        '<tool_call>[\n{"name": "get_weather", "argu',
        '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Par',
        '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n]</tool_',
    ],
)
def test_a_call_cut_short_is_unprocessable(cut):
    parser = ToolCallParser(plan())
    parser.push(cut)
    with pytest.raises(UnprocessableError) as caught:
        parser.close()
    assert caught.value.status_code == 422
    assert (caught.value.code, caught.value.param) == ("tool_call_incomplete", "tools")
    # Told that the answer ran out of its budget, the error says so, and which call.
    parser = ToolCallParser(plan())
    parser.push(cut)
    with pytest.raises(UnprocessableError) as caught:
        parser.close(cut=120)
    assert (caught.value.code, caught.value.param) == ("tool_call_incomplete", "max_tokens")
    assert "cut by max_tokens (120 tokens)" in caught.value.message


@pytest.mark.parametrize(
    ("name", "arguments"),
    [
        ("get_weather", '{"days": 2}'),  # a required property missing
        ("get_weather", '{"city": 7}'),  # of the wrong type
        ("get_weather", '{"city": "Paris", "days": 0}'),  # below the minimum
        ("send_email", '{"to": "a@b.c"}'),
        ("get_time", "{}"),  # no such tool
    ],
)
def test_a_call_that_does_not_fit_its_tool_is_unprocessable(name, arguments):
    parser = ToolCallParser(plan())
    parser.push(f'<tool_call>[\n{{"name": "{name}", "arguments": {arguments}}}\n]</tool_call>')
    with pytest.raises(UnprocessableError) as caught:
        parser.close()
    assert caught.value.code == "tool_call_invalid"


def test_a_call_that_fits_passes_close():
    parser = ToolCallParser(plan())
    parser.push(
        '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n]</tool_call>'
    )
    assert parser.close() == []
    assert [(c.name, c.arguments) for c in parser.calls] == [("get_weather", '{"city": "Paris"}')]


def test_native_blocks_parse_into_one_call_each():
    text = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "send_email", "arguments": {"to": "x", "body": "}"}}\n</tool_call>'
    )
    for size in (1, 3, 7, len(text)):
        parser = ToolCallParser(plan(native=True))
        events = parse(parser, text, size)
        assert content_of(events) == ""
        assert calls_of(events) == [
            ("get_weather", '{"city": "Paris"}'),
            ("send_email", '{"to": "x", "body": "}"}'),
        ]


def test_text_after_a_native_block_is_a_line_of_its_own():
    # Native auto mode with parallel calls lets text follow a block: its whitespace goes, a
    # line break keeps it apart from the text before the block.
    text = (
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>\n  Done.\n"
    )
    for size in (1, 2, len(text)):
        events = parse(ToolCallParser(plan(native=True)), text, size)
        content = [e.text for e in events if isinstance(e, ContentDelta)]
        assert "".join(content) == "Sure.\nDone.", size
        assert calls_of(events) == [("get_weather", '{"city": "Paris"}')]


def test_tool_calls_are_openai_shaped_with_unique_ids():
    parser = ToolCallParser(plan())
    events = parse(parser, ANSWER, 5)
    calls = tool_calls(parser)
    assert calls is not None and len(calls) == 2
    assert [(c.type, c.function.name, c.function.arguments) for c in calls] == [
        ("function", "get_weather", CALL_0),
        ("function", "send_email", CALL_1),
    ]
    ids = [c.id for c in calls]
    assert all(i.startswith("call_") and len(i) > len("call_") for i in ids)
    assert len(set(ids)) == 2
    assert ids == [e.id for e in events if isinstance(e, CallStart)]  # as streamed


# ---------------------------------------------------------------- history


def messages(*items: dict[str, Any]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(item) for item in items]


def call(name: str, arguments: str, id: str = "call_1") -> dict[str, Any]:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATION = messages(
    USER,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("get_weather", '{"city": "Paris"}')],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
)


def test_history_shows_calls_and_results_in_the_prompts_format():
    out = history(CONVERSATION, native=False)
    assert out == [
        {"role": "user", "content": USER["content"]},
        {
            "role": "assistant",
            "content": "<tool_call>[\n"
            '{"name": "get_weather", "arguments": {"city": "Paris"}}'
            "\n]</tool_call>",
        },
        {"role": "user", "content": "<tool_response>\n22 C, sunny\n</tool_response>"},
    ]


def test_a_shown_call_block_parses_back_into_the_same_calls():
    conversation = messages(
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                call("get_weather", '{"city":"Paris","days":3}', "call_a"),
                call("send_email", '{"to": "x", "body": "ünï \\"q\\""}', "call_b"),
            ],
        }
    )
    [shown] = history(conversation, native=False)
    assert shown["role"] == "assistant" and shown["content"].startswith("Checking.\n<tool_call>[")
    parser = ToolCallParser(plan())
    events = parse(parser, shown["content"], 4)
    assert content_of(events) == "Checking."
    assert [(name, json.loads(args)) for name, args in calls_of(events)] == [
        ("get_weather", {"city": "Paris", "days": 3}),
        ("send_email", {"to": "x", "body": 'ünï "q"'}),
    ]


def test_arguments_that_are_not_json_are_refused_naming_the_call():
    conversation = messages(
        USER,
        {
            "role": "assistant",
            "tool_calls": [
                call("get_weather", "{}", "call_a"),
                call("send_email", "{to:", "call_b"),
            ],
        },
    )
    for native in (False, True):
        with pytest.raises(InvalidRequestError) as caught:
            history(conversation, native=native)
        assert caught.value.param == "messages[1].tool_calls[1].function.arguments"


def test_native_history_keeps_openai_shaped_calls_and_tool_messages():
    out = history(CONVERSATION, native=True)
    assert out[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    }
    assert out[2] == {"role": "tool", "content": "22 C, sunny", "tool_call_id": "call_1"}


# ---------------------------------------------------------------- the prompt


def test_the_prompt_lists_every_offered_tool():
    prompt = instruction(plan())
    assert "get_weather" in prompt and "send_email" in prompt
    assert "The weather in a city." in prompt  # the description travels too
    assert "more tool calls" in prompt and "one function at a time" not in prompt
    assert "plain text" in prompt  # auto: answering without a call is allowed


def test_the_prompt_of_a_named_function_shows_only_it():
    prompt = instruction(plan(tool_choice={"type": "function", "function": {"name": "send_email"}}))
    assert "send_email" in prompt and "get_weather" not in prompt


def test_the_prompt_without_parallel_calls_asks_for_one_at_a_time():
    prompt = instruction(plan(parallel_tool_calls=False))
    assert "Call one function at a time." in prompt and "more tool calls" not in prompt


def test_the_prompt_of_required_mode_asks_for_a_call():
    prompt = instruction(plan(tool_choice="required"))
    assert "must call" in prompt and "plain text" not in prompt


# ---------------------------------------------------------------- message validation


@pytest.mark.parametrize(
    "message",
    [
        {"role": "tool", "content": "22 C"},  # no tool_call_id
        {"role": "user", "content": "hi", "tool_calls": [call("get_weather", "{}")]},
        {"role": "user", "content": "hi", "tool_call_id": "call_1"},
        {"role": "assistant", "content": None},  # neither content nor calls
        {"role": "assistant", "content": None, "tool_calls": []},
    ],
)
def test_messages_that_do_not_fit_their_role_are_refused(message):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [USER, message]})


def test_an_assistant_message_with_calls_needs_no_content():
    parsed = ChatCompletionRequest.model_validate(
        {
            "messages": [
                USER,
                {"role": "assistant", "content": None, "tool_calls": [call("get_weather", "{}")]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
            ]
        }
    )
    assistant = parsed.messages[1]
    assert assistant.text == "" and assistant.tool_calls[0].function.name == "get_weather"


def test_earlier_arguments_that_are_not_json_text_are_400s_not_500s():
    for bad in ("[" * 3000 + "]" * 3000, "1" + "0" * 5000, '{"a": "\\ud800"}', "{nope"):
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": bad}}
        message = ChatMessage.model_validate({"role": "assistant", "tool_calls": [call]})
        with pytest.raises(InvalidRequestError) as caught:
            history([message], native=False)
        assert caught.value.param == "messages[0].tool_calls[0].function.arguments"


def test_empty_earlier_arguments_are_no_arguments():
    message = ChatMessage.model_validate({"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]})  # fmt: skip
    (shown,) = history([message], native=True)
    assert shown["tool_calls"][0]["function"]["arguments"] == {}


def test_a_schema_that_does_not_say_object_still_gets_object_arguments():
    untyped = {"type": "function", "function": {"name": "f", "parameters": {
        "anyOf": [{"type": "string"}, {"type": "object"}]}}}  # fmt: skip
    tag = json.loads(structured_output(plan_tools(request(tools=[untyped]), native=False))
                     .structural_tag)  # fmt: skip
    defs = tag["format"]["tags"][0]["content"]["json_schema"]["$defs"]
    assert defs["tool0"]["type"] == "object"


def test_a_remote_ref_in_a_tool_schema_is_refused():
    remote = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "file:///etc/passwd"}}}}}  # fmt: skip
    error = refusal(tools=[remote])
    assert error.param == "tools[0].function.parameters" and "file:///etc/passwd" in error.message


def test_an_assistant_message_echoed_back_as_the_sdk_dumps_it_is_accepted():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    echoed = {"role": "assistant", "content": None, "refusal": None, "annotations": [],
              "audio": None, "function_call": None, "tool_calls": [call]}  # fmt: skip
    assert ChatMessage.model_validate(echoed).tool_calls[0].function.name == "f"
    with pytest.raises(ValidationError):  # the legacy function_call is not served
        ChatMessage.model_validate({**echoed, "function_call": {"name": "f", "arguments": "{}"}})
