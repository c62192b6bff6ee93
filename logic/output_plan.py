"""What a chat answer must be, in one shape for tools and response formats.

A request may constrain its answer two ways: ``response_format`` (JSON, or JSON matching a
schema) and ``tools`` (calls matching their parameters). Both say the same four things, which
:func:`plan_output` works out once and :class:`OutputPlan` carries: what the model is told,
what the chat template renders, what the runner constrains decoding to, and how the whole
answer is read back. ``CompletionService.prepare`` visits it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.tokens import StructuredOutput
from logic import response_format, tools
from logic.protocol import ChatCompletionRequest, ResponseFormat


@dataclass(frozen=True)
class OutputPlan:
    """What the answer must be, and what each stage does about it."""

    # Told to the model, in order, at the end of the system message.
    instructions: tuple[str, ...] = ()
    # The tools a chat template that takes tools renders itself (else they are instructions).
    template_tools: list[dict[str, Any]] | None = None
    # What the runner constrains decoding to: the tool calls' shape, else the format's.
    structured: StructuredOutput | None = None
    # How the whole answer is read back: calls parsed out of it, then the format enforced.
    tools: tools.ToolPlan | None = None
    response_format: ResponseFormat | None = None


# A plain answer: nothing told, rendered, constrained or enforced (text completions too).
FREE = OutputPlan()


def plan_output(request: ChatCompletionRequest, *, native_tools: bool) -> OutputPlan:
    """The plan for ``request``; ``native_tools``: the chat template renders tools itself.
    Raises a 400 for tools that cannot be served (a schema's own check,
    :func:`logic.response_format.check`, comes after the pre-steps)."""
    tool_plan = tools.plan_tools(request, native=native_tools)
    fmt = request.response_format
    told = [response_format.instruction(fmt)]
    if tool_plan is not None and not tool_plan.native:
        told.append(tools.instruction(tool_plan))
    instructions = tuple(t for t in told if t)
    if tool_plan is None:
        return OutputPlan(
            instructions=instructions,
            structured=response_format.structured_output(fmt),
            response_format=fmt,
        )
    return OutputPlan(
        instructions=instructions,
        template_tools=tools.template_tools(tool_plan) if tool_plan.native else None,
        structured=tools.structured_output(tool_plan),
        tools=tool_plan,
        response_format=fmt,
    )


def with_instructions(
    messages: list[dict[str, Any]], instructions: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Each instruction at the end of the system message (one is added when there is none)."""
    for instruction in instructions:
        if messages and messages[0]["role"] == "system":
            first = {**messages[0], "content": f"{messages[0]['content']}\n\n{instruction}"}
            messages = [first, *messages[1:]]
        else:
            messages = [{"role": "system", "content": instruction}, *messages]
    return messages
