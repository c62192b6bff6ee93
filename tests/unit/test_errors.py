"""Request validation errors name the offending field in an OpenAI-shaped body."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from logic.errors import RunnerUnavailableError, from_validation_error
from logic.protocol import ChatCompletionRequest

USER = [{"role": "user", "content": "hi"}]


def error_for(body: dict):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    return from_validation_error(info.value)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "messages", "missing_required_parameter"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
        # A tool message names the call it answers; only assistant messages may go without
        # content (when they carry tool calls).
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]", "invalid_value"),
        ({"messages": [{"role": "user"}]}, "messages[0]", "invalid_value"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
            "messages[0].tool_calls",
            "invalid_value",
        ),
        ({"messages": USER, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"messages": USER, "max_completion_tokens": -5}, "max_completion_tokens", "invalid_value"),
        ({"messages": USER, "temperature": -0.1}, "temperature", "invalid_value"),
        ({"messages": USER, "top_p": 0}, "top_p", "invalid_value"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"messages": USER, "stop": ""}, "stop", "invalid_value"),
        ({"messages": USER, "n": 9}, "n", "invalid_value"),
        ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ({"messages": USER, "presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
        (
            {"messages": USER, "response_format": {"type": "xml"}},
            "response_format",
            "invalid_value",
        ),
        ({"messages": USER, "logit_bias": {"1": 2}}, "logit_bias", "unsupported_parameter"),
    ],
)
def test_each_bad_field_is_a_400_that_names_it(body, param, code):
    error = from_validation_error_checked(body)
    assert error.status_code == 400
    assert error.param == param
    assert error.code == code
    assert param in error.message


def from_validation_error_checked(body: dict):
    error = error_for(body)
    shape = error.to_body()
    assert set(shape) == {"error"}
    assert set(shape["error"]) == {"message", "type", "param", "code"}
    assert shape["error"]["type"] == "invalid_request_error"
    return error


def test_runner_unavailable_is_a_503_with_no_internals():
    body = RunnerUnavailableError().to_body()["error"]
    assert RunnerUnavailableError.status_code == 503
    assert body["code"] == "runner_unavailable" and "Traceback" not in body["message"]
