"""Every error status through the openai SDK's async client, in process: the SDK must raise
the exception class it documents for each, with our OpenAI-shaped body."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from pydantic import SecretStr

USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def app(client):
    return client.app


def call(app, key: str = "unused", **kwargs):
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            api = openai.AsyncOpenAI(
                base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0
            )
            body = {"model": "tiny-chat", "messages": USER, "max_tokens": 4, **kwargs}
            return await api.chat.completions.create(**body)

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("kwargs", "error", "code"),
    [
        ({"temperature": 3}, openai.BadRequestError, "invalid_value"),
        ({"extra_body": {"functions": []}}, openai.BadRequestError, "unsupported_parameter"),
        ({"model": "gpt-4o"}, openai.NotFoundError, "model_not_found"),
        (  # two tokens cannot hold the object: cut by max_tokens, the JSON is not whole
            {
                "max_tokens": 2,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"type": "integer"}},
                            "required": ["a"],
                        },
                    },
                },
            },
            openai.UnprocessableEntityError,
            "response_format_not_met",
        ),
    ],
)
def test_request_errors_map_to_sdk_exceptions(app, kwargs, error, code):
    with pytest.raises(error) as info:
        call(app, **kwargs)
    assert info.value.body["code"] == code


def test_gate_errors_map_to_sdk_exceptions(app, monkeypatch):
    import service

    monkeypatch.setattr(service.settings, "api_key", SecretStr("k"))
    with pytest.raises(openai.AuthenticationError):
        call(app, key="wrong")
    assert call(app, key="k").choices  # the right key passes
    monkeypatch.setattr(service.settings, "api_key", None)
    monkeypatch.setattr(service.settings, "max_request_bytes", 1024)
    with pytest.raises(openai.APIStatusError) as info:
        call(app, messages=[{"role": "user", "content": "x" * 2000}])
    assert info.value.status_code == 413
    monkeypatch.setattr(service.settings, "max_request_bytes", 1_048_576)
    monkeypatch.setattr(service.settings, "max_concurrent_requests", 0)
    with pytest.raises(openai.RateLimitError):
        call(app)
