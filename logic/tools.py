"""Tool calling: OpenAI's ``tools`` and ``tool_choice`` over a model that writes text.

The model is told about the tools, and writes a call as a tagged JSON block::

    <tool_call>[
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    ]</tool_call>

That is the format SmolLM2 (the default model) was trained on: one block holding a JSON
array of calls. A model whose chat template takes ``tools`` itself (Qwen2.5, Hermes, SmolLM3
and most recent ones) gets them rendered by its own template, and writes the Hermes form, one
call object per block (``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``).

Decoding is constrained to the call's shape (:func:`structured_output`), so every call names
a tool the request offered and its arguments match that tool's ``parameters`` schema:

- ``auto``: free text until ``<tool_call>``; from there, the call block and then the end;
- ``required``: only the call block; a named function: only a call to it;
- ``none`` (the default without tools): the tools are not shown, the answer is plain text.

``parallel_tool_calls`` false, or a named function, allows one call per answer. The answer is
then split back into ``content`` and ``tool_calls`` by :class:`ToolCallParser`, whole or as a
stream, in which a call's index, id and name come first, then pieces of its arguments' JSON
text. The argument text is the model's own (a client concatenating the pieces gets exactly the
whole answer's).

This module imports neither torch nor a grammar engine: the grammar travels to the runner as
an xgrammar structural tag, JSON text that the native engine and vLLM both compile.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from contract.tokens import StructuredOutput
from logic.errors import InvalidRequestError, UnprocessableError
from logic.json_output import schema_errors, validation_errors
from logic.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ToolCall,
    ToolDefinition,
)

CALL_BEGIN = "<tool_call>"
CALL_END = "</tool_call>"
RESPONSE_BEGIN, RESPONSE_END = "<tool_response>", "</tool_response>"
# Whitespace the call's JSON may hold in one run: the trained format's newlines and spaces
# after ":" and ",", but no free runs for a small model to wander in.
MAX_WHITESPACE = 1
_ANY_ARGUMENTS: dict[str, Any] = {"type": "object"}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolPlan:
    """What a request asks of its tools, checked; None of it when ``tool_choice`` is none."""

    tools: list[ToolDefinition]
    mode: Literal["auto", "required", "named"]
    parallel: bool
    native: bool  # the chat template renders the tools; calls are Hermes blocks
    name: str | None = None  # the named function

    @property
    def offered(self) -> list[ToolDefinition]:
        """The tools a call may name."""
        if self.name is None:
            return self.tools
        return [t for t in self.tools if t.function.name == self.name]

    def parameters(self, name: str) -> dict[str, Any]:
        """The arguments' schema of ``name``, one of the tools a call may name."""
        for tool in self.offered:
            if tool.function.name == name:
                return tool.function.parameters or _ANY_ARGUMENTS
        raise KeyError(name)


def plan_tools(request: ChatCompletionRequest, *, native: bool) -> ToolPlan | None:
    """The request's tool plan; a 400 for what OpenAI refuses too (a ``tool_choice`` without
    tools, a named function that is not among them, duplicate names, bad schemas)."""
    choice, tools = request.tool_choice, request.tools
    if tools is None:
        if choice is not None and choice != "none":
            raise InvalidRequestError(
                "'tool_choice' is only allowed when 'tools' are specified.",
                param="tool_choice",
                code="invalid_value",
            )
        return None
    names = [tool.function.name for tool in tools]
    for i, tool in enumerate(tools):
        if names.index(tool.function.name) != i:
            raise InvalidRequestError(
                f"Tool names must be unique: {tool.function.name!r} is given twice.",
                param=f"tools[{i}].function.name",
                code="invalid_value",
            )
        parameters = tool.function.parameters or _ANY_ARGUMENTS
        problems = schema_errors(parameters)
        if parameters.get("type", "object") != "object":  # arguments are always an object
            problems = ["the arguments' schema must have type 'object'", *problems]
        if problems:
            raise InvalidRequestError(
                f"Invalid JSON schema for {tool.function.name!r}: {'; '.join(problems[:3])}.",
                param=f"tools[{i}].function.parameters",
                code="invalid_value",
            )
    if choice == "none":
        return None
    name = None
    if choice is None or choice == "auto":
        mode = "auto"
    elif choice == "required":
        mode = "required"
    else:
        mode, name = "named", choice.function.name
        if name not in names:
            raise InvalidRequestError(
                f"tool_choice names the function {name!r}, which is not among 'tools'.",
                param="tool_choice",
                code="invalid_value",
            )
    if request.response_format is not None and request.response_format.type != "text":
        raise InvalidRequestError(
            "'response_format' cannot be combined with tool calls; use tool_choice 'none', "
            "or make the format a tool.",
            param="response_format",
            code="unsupported_parameter",
        )
    # A named function is called exactly once, as OpenAI's API does: parallel_tool_calls
    # counts for auto and required only.
    parallel = request.parallel_tool_calls is not False and mode != "named"
    return ToolPlan(list(tools), mode, parallel, native, name)


# ---------------------------------------------------------------- the prompt


def _tool_list(tools: list[ToolDefinition]) -> str:
    return json.dumps(
        [t.model_dump(exclude_none=True) for t in tools], ensure_ascii=False, indent=None
    )


def instruction(plan: ToolPlan) -> str:
    """The documented tool prompt, for a chat template that does not take tools: SmolLM2's
    trained tool format, with what this request's ``tool_choice`` asks."""
    one = not plan.parallel
    lines = [
        "You are an expert in composing functions. You are given a question and a set of "
        "possible functions. Based on the question, you may call one or more of them.",
        f"You have access to the following tools:\n<tools>{_tool_list(plan.offered)}</tools>",
        "To call functions, answer in this format and include NO other text:",
        f'{CALL_BEGIN}[\n{{"name": "func_name1", "arguments": {{"argument1": "value1"}}}}'
        + ("" if one else ",\n(more tool calls as required)")
        + f"\n]{CALL_END}",
        "Make sure the arguments have the right types.",
    ]
    if one:
        lines.append("Call one function at a time.")
    if plan.mode == "auto":
        lines.append("If none of the functions fits the question, answer it in plain text.")
    elif plan.mode == "required":
        lines.append("You must call at least one of the functions.")
    else:
        lines.append(f"Call the function {plan.name!r}.")
    return "\n".join(lines)


def template_tools(plan: ToolPlan) -> list[dict[str, Any]]:
    """The tools as a chat template that takes ``tools`` reads them (OpenAI's shape)."""
    return [t.model_dump(exclude_none=True) for t in plan.offered]


def history(messages: list[ChatMessage], *, native: bool) -> list[dict[str, Any]]:
    """The conversation as template messages. Earlier calls and their results are shown to
    the model as it writes and reads them: for a template that takes tools, as OpenAI-shaped
    ``tool_calls`` (arguments parsed) and ``tool`` messages; otherwise in the tool prompt's
    format: an assistant turn holding the call block, and each result as a user turn in
    ``<tool_response>`` tags (SmolLM2's trained form). Tool results are untrusted text like
    user messages: the template's markers stay the only special tokens (``encode_conversation``)."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message.tool_calls is None and message.role != "tool":
            out.append({"role": message.role, "content": message.text})
            continue
        if message.role == "tool":
            if native:
                out.append(
                    {"role": "tool", "content": message.text, "tool_call_id": message.tool_call_id}
                )
            else:
                content = f"{RESPONSE_BEGIN}\n{message.text}\n{RESPONSE_END}"
                out.append({"role": "user", "content": content})
            continue
        calls = [(c.function.name, _arguments(c.function.arguments, i, j))
                 for j, c in enumerate(message.tool_calls or [])]  # fmt: skip
        if native:
            out.append({
                "role": "assistant",
                "content": message.text,
                "tool_calls": [
                    {"id": c.id, "type": "function",
                     "function": {"name": name, "arguments": arguments}}
                    for c, (name, arguments) in zip(message.tool_calls or [], calls, strict=True)
                ],
            })  # fmt: skip
            continue
        block = ",\n".join(
            json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
            for name, arguments in calls
        )
        text = f"{CALL_BEGIN}[\n{block}\n]{CALL_END}"
        content = f"{message.text}\n{text}" if message.text else text
        out.append({"role": "assistant", "content": content})
    return out


def _arguments(text: str, message: int, call: int) -> Any:
    """An earlier call's arguments, parsed (empty text is no arguments, as some clients send)."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode()  # no lone surrogates ("\ud800")
    except (ValueError, RecursionError):  # not JSON, too deep, too many digits, not UTF-8
        raise InvalidRequestError(
            "A tool call's 'arguments' must be JSON text.",
            param=f"messages[{message}].tool_calls[{call}].function.arguments",
            code="invalid_value",
        ) from None
    return value


# ---------------------------------------------------------------- the grammar


def structured_output(plan: ToolPlan) -> StructuredOutput:
    """The constraint the runner decodes under: the call's shape, as a structural tag."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": {"$ref": f"#/$defs/{key}"}},
            "required": ["name", "arguments"],
        }
        for name, key in _tool_keys(plan)
    ]
    defs = _hoisted_defs(plan)
    if plan.native:  # one call object per block, several blocks for parallel calls
        schema = {"anyOf": calls, "$defs": defs}
        block = _tag(f"{CALL_BEGIN}\n", schema, f"\n{CALL_END}")
        if plan.mode == "auto":
            form = {
                "type": "triggered_tags",
                "triggers": [CALL_BEGIN],
                "tags": [block],
                "stop_after_first": not plan.parallel,
            }
        else:
            form = {
                "type": "tags_with_separator",
                "tags": [block],
                "separator": "\n",
                "at_least_one": True,
                "stop_after_first": not plan.parallel,
            }
    else:  # one block holding an array of calls
        schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1, "$defs": defs}
        if not plan.parallel:
            schema["maxItems"] = 1
        block = _tag(CALL_BEGIN, schema, CALL_END)
        if plan.mode == "auto":
            form = {
                "type": "triggered_tags",
                "triggers": [CALL_BEGIN],
                "tags": [block],
                "stop_after_first": True,
            }
        else:
            form = block
    tag = {"type": "structural_tag", "format": form}
    return StructuredOutput(
        kind="structural_tag", structural_tag=json.dumps(tag, separators=(",", ":"))
    )


def _tag(begin: str, schema: dict[str, Any], end: str) -> dict[str, Any]:
    content = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_WHITESPACE}
    return {"type": "tag", "begin": begin, "content": content, "end": end}


def _tool_keys(plan: ToolPlan) -> list[tuple[str, str]]:
    return [(t.function.name, f"tool{i}") for i, t in enumerate(plan.offered)]


def _hoisted_defs(plan: ToolPlan) -> dict[str, Any]:
    """Each tool's ``parameters`` as ``$defs/tool<i>`` of one schema, with its own ``$defs``
    (what pydantic writes for nested models and enums) beside it as ``tool<i>.<name>``, and
    its ``$ref`` s rewritten to match: a tool's schema keeps its meaning inside the call's."""
    defs: dict[str, Any] = {}
    for (_, key), tool in zip(_tool_keys(plan), plan.offered, strict=True):
        parameters = copy.deepcopy(tool.function.parameters or _ANY_ARGUMENTS)
        for section in ("$defs", "definitions"):
            for sub, sub_schema in (parameters.pop(section, None) or {}).items():
                defs[f"{key}.{sub}"] = _rewrite_refs(sub_schema, key)
        # Arguments are an object even where the schema does not say so ({"anyOf": ...}).
        defs[key] = _rewrite_refs({**parameters, "type": "object"}, key)
    return defs


_LOCAL_REF = re.compile(r"^#(?:/(?:\$defs|definitions)/([^/]+))?$")


def _rewrite_refs(schema: Any, key: str) -> Any:
    if isinstance(schema, list):
        return [_rewrite_refs(item, key) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for field, value in schema.items():
        if field == "$ref" and isinstance(value, str) and (m := _LOCAL_REF.match(value)):
            value = f"#/$defs/{key}" + (f".{m.group(1)}" if m.group(1) else "")
        out[field] = _rewrite_refs(value, key)
    return out


# ---------------------------------------------------------------- the answer


@dataclass
class ContentDelta:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class ArgumentsDelta:
    index: int
    text: str


Event = ContentDelta | CallStart | ArgumentsDelta

_HEADER = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_LONGEST_HEADER = 256  # '{"name": "<64 characters>", "arguments": ', with room for spaces


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


class ToolCallParser:
    """Splits an answer, piece by piece, into content and tool calls (:data:`Event` s).

    Text that may be the start of ``<tool_call>`` is held back until the next piece shows
    what it is. Inside a block, a call is announced once its name is known; its arguments'
    JSON text follows as it comes, up to the end of the arguments object. The shape is the
    one decoding was constrained to; :meth:`close` checks what came against the tools."""

    def __init__(self, plan: ToolPlan):
        self._plan = plan
        self._buffer = ""
        self._state = "text"  # text | block | call | arguments | object_end
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._fresh = True
        self._said = False  # some content was given out
        self.calls: list[ParsedCall] = []

    def push(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self, *, cut: int | None = None) -> list[Event]:
        """The rest of the answer; an :class:`UnprocessableError` (422) when a call is cut
        short (``cut``: the budget the answer ran out of) or does not fit the tools."""
        events: list[Event] = []
        if self._state != "text":
            name = f" of {self.calls[-1].name!r}" if self.calls else ""
            why = (
                f"it was cut by max_tokens ({cut} tokens) or the context window"
                if cut is not None
                else "it was most likely cut by max_tokens"
            )
            raise UnprocessableError(
                f"The tool call{name} is not complete: {why}. Retry with a larger max_tokens.",
                param="max_tokens" if cut is not None else "tools",
                code="tool_call_incomplete",
            )
        if self._buffer.strip():
            events.append(ContentDelta(self._buffer.rstrip()))
        self._buffer = ""
        for call in self.calls:
            self._check(call)
        return events

    def _check(self, call: ParsedCall) -> None:
        try:
            arguments = json.loads(call.arguments)
        except json.JSONDecodeError:
            arguments = None
        try:
            schema = self._plan.parameters(call.name)
        except KeyError:
            schema = None
        problems = (
            ["it names no tool of the request"] if schema is None
            else ["its arguments are not a JSON object"] if not isinstance(arguments, dict)
            else validation_errors(arguments, schema)
        )  # fmt: skip
        if problems:
            raise UnprocessableError(
                f"The call of {call.name!r} does not fit its tool: {'; '.join(problems)}.",
                param="tools",
                code="tool_call_invalid",
            )

    def _step(self, events: list[Event]) -> bool:
        """One move of the state machine; False when it needs more text."""
        buffer = self._buffer
        if self._state == "text":
            if self._fresh:  # no whitespace at the start of content, nor after a block
                buffer = self._buffer = buffer.lstrip()
                if buffer and self._said:  # text after a block (Hermes): a line of its own
                    buffer = self._buffer = "\n" + buffer
                self._fresh = not buffer
            at = buffer.find(CALL_BEGIN)
            if at < 0:
                # Held back: what may begin a tag, and whitespace before it (given out with
                # the text that follows it, dropped before a tag and at the end).
                body = buffer[: len(buffer) - _possible_start(buffer)].rstrip()
                if body:
                    events.append(ContentDelta(body))
                    self._buffer, self._said = buffer[len(body) :], True
                return False
            if buffer[:at].rstrip():
                events.append(ContentDelta(buffer[:at].rstrip()))
                self._said = True
            self._buffer, self._state = buffer[at + len(CALL_BEGIN) :], "block"
            return True
        if self._state == "block":  # between calls: "[", ",", "]", whitespace, or the end tag
            rest = buffer.lstrip(" \t\r\n[,]")
            self._buffer = rest
            if not rest:
                return False
            if rest[0] == "{":
                self._state = "call"
                return True
            if rest.startswith(CALL_END):
                self._buffer, self._state = rest[len(CALL_END) :], "text"
                self._fresh = True
                return True
            if CALL_END.startswith(rest):
                return False
            raise _unreadable()
        if self._state == "call":
            header = _HEADER.match(buffer)
            if header is None:
                if len(buffer) > _LONGEST_HEADER:
                    raise _unreadable()
                return False
            call = ParsedCall(new_call_id(), json.loads(header.group(1)))
            self.calls.append(call)
            events.append(CallStart(len(self.calls) - 1, call.id, call.name))
            self._buffer, self._state = buffer[header.end() :], "arguments"
            self._depth, self._in_string, self._escaped = 0, False, False
            return True
        if self._state == "arguments":
            if self._depth == 0:  # the value has not begun: no whitespace before it
                buffer = self._buffer = buffer.lstrip()
                if not buffer:
                    return False
            end = self._scan(buffer)
            piece = buffer if end is None else buffer[:end]
            if piece:
                self.calls[-1].arguments += piece
                events.append(ArgumentsDelta(len(self.calls) - 1, piece))
            self._buffer = "" if end is None else buffer[end:]
            if end is not None:
                self._state = "object_end"
            return end is not None
        # object_end: the call object closes after its arguments
        rest = buffer.lstrip()
        self._buffer = rest
        if not rest:
            return False
        if rest[0] != "}":
            raise _unreadable()
        self._buffer, self._state = rest[1:], "block"
        return True

    def _scan(self, text: str) -> int | None:
        """Where the arguments' JSON value ends in ``text`` (continuing the scan of earlier
        pieces), or None when it goes on."""
        for i, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


def _unreadable() -> UnprocessableError:
    return UnprocessableError(
        "The model wrote a tool call the service cannot read.",
        param="tools",
        code="tool_call_invalid",
    )


def _possible_start(text: str) -> int:
    """How many characters at the end of ``text`` may begin ``<tool_call>``."""
    for size in range(min(len(text), len(CALL_BEGIN) - 1), 0, -1):
        if CALL_BEGIN.startswith(text[-size:]):
            return size
    return 0


def tool_calls(parser: ToolCallParser) -> list[ToolCall] | None:
    """The calls a parser read, in OpenAI's shape (None when there were none)."""
    if not parser.calls:
        return None
    return [
        ToolCall(id=c.id, function={"name": c.name, "arguments": c.arguments}) for c in parser.calls
    ]
