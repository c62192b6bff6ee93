"""The API in process (``TestClient(ChatAPI.to_asgi())``) with the tiny model: routes, the
OpenAI client, and bad input that must never become a 500."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import SecretStr

USER = [{"role": "user", "content": "Hello, how are you today?"}]


def sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]


def test_models_lists_the_served_model(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny-chat"]


def test_chat_completion_has_the_openai_shape(client):
    resp = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 5, "seed": 1})
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-chat"
    assert body["id"].startswith("chatcmpl-") and body["system_fingerprint"].startswith("fp_")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 5
    assert usage["prompt_tokens"] > 10  # the template and system prompt are counted
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_seeded_requests_are_reproducible_through_the_api(client):
    body = {"messages": USER, "max_tokens": 12, "temperature": 1.0, "seed": 99}
    first = client.post("/v1/chat/completions", json=body).json()
    second = client.post("/v1/chat/completions", json=body).json()
    assert first["choices"][0]["message"] == second["choices"][0]["message"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [first["usage"][k] for k in counts] == [second["usage"][k] for k in counts]


def test_usage_says_how_much_of_the_prompt_the_prefix_cache_held(client):
    """OpenAI's usage.prompt_tokens_details.cached_tokens, from the engine's own count: the
    same prompt again finds its full KV blocks cached (all but the last token, which is always
    computed for its logits); whole and streamed alike."""
    messages = [{"role": "user", "content": "Name three colours of the rainbow, please. " * 3}]
    body = {"messages": messages, "max_tokens": 3, "temperature": 0}
    client.post("/v1/chat/completions", json=body)
    again = client.post("/v1/chat/completions", json=body).json()["usage"]
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < again["prompt_tokens"]
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=stream) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: {")]
    assert json.loads(events[-1])["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    other = {**body, "messages": [{"role": "user", "content": "Something else entirely."}]}
    fresh = client.post("/v1/chat/completions", json=other).json()["usage"]
    assert fresh["prompt_tokens_details"]["cached_tokens"] < cached


def test_streaming_sends_sse_chunks_then_done(client):
    whole = client.post(
        "/v1/chat/completions", json={"messages": USER, "max_tokens": 12, "temperature": 0}
    ).json()
    resp = client.post(
        "/v1/chat/completions",
        json={"messages": USER, "max_tokens": 12, "temperature": 0, "stream": True},
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]


def test_the_official_openai_client_works_against_the_app(client):
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    assert [m.id for m in api.models.list()] == ["tiny-chat"]
    completion = api.chat.completions.create(
        model="tiny-chat", messages=USER, max_tokens=6, temperature=0
    )
    assert completion.usage.completion_tokens <= 6
    stream = api.chat.completions.create(
        model="tiny-chat",
        messages=USER,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        completion.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


LONG = [{"role": "user", "content": "Paris " * 400}]


@pytest.mark.parametrize(
    ("raw", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({}).encode(), 400, "messages"),
        (json.dumps({"messages": []}).encode(), 400, "messages"),
        (
            json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
            400,
            "messages[0].role",
        ),
        (json.dumps({"messages": LONG}).encode(), 400, "messages"),
        (json.dumps({"messages": USER, "max_tokens": 0}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": USER, "max_tokens": 100_000}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": USER, "temperature": -1}).encode(), 400, "temperature"),
        (json.dumps({"messages": USER, "tools": []}).encode(), 400, "tools"),
        (json.dumps({"messages": USER, "model": "gpt-4o"}).encode(), 404, "model"),
        (
            json.dumps({"messages": USER, "stream": True, "max_tokens": -1}).encode(),
            400,
            "max_tokens",
        ),
        (json.dumps({"messages": USER, "seed": 2**70}).encode(), 400, "seed"),
        (json.dumps({"messages": USER, "stop": "x" * 5000}).encode(), 400, "stop"),
        (json.dumps({"messages": [{**USER[0], "name": "bob"}]}).encode(), 400, "messages[0].name"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
        (b'{"messages": [], "seed": ' + b"9" * 5000 + b"}", 400, None),
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
        (b"\xff\xfe not utf-8", 400, None),
        # JSON types are strict, as in OpenAI's API: no numbers in strings, no booleans as 0/1.
        (json.dumps({"messages": USER, "max_tokens": "16"}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": USER, "top_logprobs": False}).encode(), 400, "top_logprobs"),
    ],
)
def test_bad_input_is_a_4xx_openai_error_and_the_service_keeps_serving(client, raw, status, param):
    resp = client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert "Traceback" not in resp.text and "/site-packages/" not in resp.text
    ok = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/chat/completions", 405),
        ("TRACE", "/v1/models", 405),
        ("POST", "/v1/embeddings", 404),
    ],
)
def test_wrong_routes_get_openai_shaped_errors(client, method, path, status):
    resp = client.request(method, path, json={})
    assert resp.status_code == status
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    if status == 405:  # RFC 9110: a 405 lists the methods the route has
        allowed = {m.strip() for m in resp.headers["allow"].split(",")}
        assert allowed in ({"POST"}, {"GET", "HEAD"})


def test_the_v1_routes_describe_themselves_in_openapi(client):
    spec = client.get("/v1/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    assert set(spec["paths"]) == {"/chat/completions", "/completions", "/models"}
    chat = spec["paths"]["/chat/completions"]["post"]
    request_ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request_schema = spec["components"]["schemas"][request_ref.rsplit("/", 1)[1]]
    assert {"messages", "max_tokens", "stream"} <= set(request_schema["properties"])
    assert {"400", "401", "413", "429", "503", "504"} <= set(chat["responses"])


def test_a_vanishingly_small_temperature_is_greedy_not_an_error(client):
    greedy = {"messages": USER, "max_tokens": 8, "temperature": 0}
    tiny = {**greedy, "temperature": 1e-38}
    first = client.post("/v1/chat/completions", json=greedy).json()
    second = client.post("/v1/chat/completions", json=tiny)
    assert second.status_code == 200
    assert second.json()["choices"][0]["message"] == first["choices"][0]["message"]


def test_health_endpoints_are_served(client):
    # /metrics needs the served process's Prometheus set-up: the end-to-end test checks it.
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


@pytest.fixture
def api(client) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )


def test_n_choices_are_distinct_samples_with_summed_usage(api):
    out = api.chat.completions.create(
        model="tiny-chat", messages=USER, n=3, max_tokens=8, temperature=1.0, seed=5
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.message.content for c in out.choices]
    assert len(set(texts)) > 1  # each choice has its own seed
    one = api.chat.completions.create(
        model="tiny-chat", messages=USER, max_tokens=8, temperature=1.0, seed=5
    )
    assert one.choices[0].message.content == texts[0]  # choice 0 is the plain seeded request
    assert out.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert out.usage.completion_tokens == sum(
        api.chat.completions.create(
            model="tiny-chat", messages=USER, max_tokens=8, temperature=1.0, seed=5 + i
        ).usage.completion_tokens
        for i in range(3)
    )


def test_n_choices_stream_with_their_indexes(api):
    stream = api.chat.completions.create(
        model="tiny-chat", messages=USER, n=2, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices}
    assert set(finishes) == {0, 1} and all(finishes.values())
    text = {i: "" for i in (0, 1)}
    for c in chunks:
        if c.choices:
            text[c.choices[0].index] += c.choices[0].delta.content or ""
    assert text[0] == text[1]  # greedy: both choices are the same answer
    assert chunks[-1].usage.completion_tokens > 0


def test_logprobs_and_top_logprobs(api):
    out = api.chat.completions.create(
        model="tiny-chat", messages=USER, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    content = out.choices[0].logprobs.content
    assert content and len(content) <= out.usage.completion_tokens
    assert "".join(e.token for e in content).startswith(out.choices[0].message.content[:1])
    for entry in content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    plain = api.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=6)
    assert plain.choices[0].logprobs is None


def test_top_logprobs_without_logprobs_is_refused(api):
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="tiny-chat", messages=USER, top_logprobs=2)
    assert info.value.body["param"] == "top_logprobs"


def test_penalties_change_greedy_output(api):
    base = {"model": "tiny-chat", "messages": USER, "max_tokens": 24, "temperature": 0}
    plain = api.chat.completions.create(**base).choices[0].message.content
    penalized = api.chat.completions.create(**base, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized.choices[0].message.content != plain


def test_an_api_key_is_required_when_configured(client, monkeypatch):
    import service

    monkeypatch.setattr(service.settings, "api_key", SecretStr("s3cret"))
    no_key = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(
        base_url="http://testserver/v1", api_key="nope", http_client=client, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(
        base_url="http://testserver/v1", api_key="s3cret", http_client=client, max_retries=0
    )
    assert right.models.list().data[0].id == "tiny-chat"


def test_a_body_over_the_limit_is_a_413(client, monkeypatch):
    import service

    monkeypatch.setattr(service.settings, "max_request_bytes", 2048)
    big = {"messages": [{"role": "user", "content": "x" * 4096}]}
    resp = client.post("/v1/chat/completions", json=big)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    chunked = client.post(  # no Content-Length: the limit applies while reading
        "/v1/chat/completions", content=iter([json.dumps(big).encode()])
    )
    assert chunked.status_code == 413


def test_requests_over_the_concurrency_limit_get_a_429(client, monkeypatch):
    import service

    monkeypatch.setattr(service.settings, "max_concurrent_requests", 1)
    api = openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )
    stream = api.chat.completions.create(
        model="tiny-chat", messages=USER, max_tokens=50, temperature=0, stream=True
    )
    next(iter(stream))  # one request in flight
    with pytest.raises(openai.RateLimitError) as refused:
        api.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=2)
    assert refused.value.response.headers["retry-after"] == "1"
    stream.close()


def test_text_completions_whole_and_streamed(api):
    whole = api.completions.create(
        model="tiny-chat", prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    choice = whole.choices[0]
    assert choice.finish_reason in {"stop", "length"} and choice.text
    assert 0 < whole.usage.completion_tokens <= 8
    streamed = api.completions.create(
        model="tiny-chat", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completion_logprobs_and_n(api):
    out = api.completions.create(
        model="tiny-chat", prompt=["Hello"], max_tokens=5, temperature=0, logprobs=2, n=2
    )
    assert [c.index for c in out.choices] == [0, 1]
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) > 0
    assert lp.text_offset[0] == len("Hello")
    assert all(len(top) <= 2 for top in lp.top_logprobs)


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of"),
     ({"prompt": ["a", "b"]}, "prompt"), ({"logprobs": 6}, "logprobs")],
)  # fmt: skip
def test_text_completion_parameters_we_do_not_implement_are_refused(client, extra, param):
    body = {"prompt": "Hello", "max_tokens": 2, **extra}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param


def test_native_bentoml_endpoints(client):
    body = {"messages": USER, "max_tokens": 6, "temperature": 0}
    whole = client.post("/chat_completion", json=body)
    assert whole.status_code == 200, whole.text
    answer = whole.json()["choices"][0]["message"]["content"]
    streamed = client.post("/chat_stream", json=body)
    assert streamed.status_code == 200
    assert streamed.text == answer
    bad = client.post("/chat_completion", json={**body, "max_tokens": 10**6})
    assert bad.status_code == 400 and "max_tokens" in bad.text


@pytest.mark.parametrize("path", ["/chat_completion", "/chat_stream"])
def test_native_endpoints_refuse_a_body_that_is_not_json(client, path):
    # BentoML's own parser answered a multipart type without a boundary with a 500.
    headers = {"Content-Type": "multipart/form-data"}
    resp = client.post(path, content=b'{"messages": []}', headers=headers)
    assert resp.status_code == 415
    assert resp.json()["error"]["code"] == "unsupported_media_type"


# Small (the tiny model's window is 256 tokens, and the schema is in the prompt) and bounded:
# a random model must finish it.
BOUNDED = {
    "type": "object",
    "properties": {"s": {"enum": ["S", "M"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["s", "n"],
}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def test_response_format_through_the_sdk(api):
    # The tiny random model writes what its schema allows, and it parses, whatever the seed.
    for seed in range(3):
        out = api.chat.completions.create(
            model="tiny-chat", messages=USER, max_tokens=40, seed=seed,
            response_format=schema_format(BOUNDED),
        )  # fmt: skip
        assert out.choices[0].finish_reason == "stop"
        value = json.loads(out.choices[0].message.content)
        assert set(value) == {"s", "n"} and value["s"] in "SM" and value["n"] <= 9
    # Cut by max_tokens before the JSON is whole: a 422 that says so.
    with pytest.raises(openai.UnprocessableEntityError) as info:
        api.chat.completions.create(
            model="tiny-chat", messages=USER, max_tokens=3,
            response_format=schema_format(BOUNDED),
        )  # fmt: skip
    assert info.value.body["code"] == "response_format_not_met"
    assert "max_tokens" in info.value.body["message"]
    # Not a schema: the API refuses it. One the grammar engine cannot compile: the runner does.
    for schema, says in (({"type": "strng"}, "strng"), ({"type": "string", "pattern": "(?<=a)b"},
                                                          "Lookbehind")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(
                model="tiny-chat", messages=USER, max_tokens=8,
                response_format=schema_format(schema),
            )  # fmt: skip
        assert says in info.value.body["message"]


def test_an_unexpected_failure_is_an_openai_shaped_500(client, api, monkeypatch):
    import service

    async def broken(request):
        raise RuntimeError("a bug")

    monkeypatch.setattr(service.api_app.state.chat, "create", broken)
    with pytest.raises(openai.InternalServerError) as info:
        api.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=2)
    assert "a bug" not in str(info.value.body)  # no internals leak
    assert client.get("/v1/models").status_code == 200


@pytest.mark.parametrize(
    "failure",
    [
        lambda: ConnectionRefusedError(111, "Connection refused"),
        lambda: __import__("aiohttp").ServerDisconnectedError(),
        # The API has one HTTP client library (aiohttp): a body cut under it.
        lambda: __import__("aiohttp").ClientPayloadError("Response payload is not completed"),
        lambda: __import__("contract.errors").errors.EngineClosedError("engine_stopped"),
    ],
    ids=["refused", "disconnected", "payload-cut", "engine-stopped"],
)
def test_a_runner_that_cannot_be_reached_is_a_503(client, monkeypatch, failure):
    """The runner client fails as a real one does (the API's own mapping, ``_relay``, makes
    it a 503): refused, dropped, or an engine that stopped behind a live runner."""
    import service

    api = service.api_app.state.chat._generate.__self__

    class Unreachable:
        async def generate(self, prompt_ids, params, *, request_id=None):
            raise failure()
            yield  # an async generator, like the real one

    monkeypatch.setattr(api, "_runners", Unreachable())
    for stream in (False, True):
        body = {"messages": USER, "max_tokens": 2, "stream": stream}
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "runner_unavailable"
        assert int(resp.headers["retry-after"]) > 0


def test_a_runner_at_capacity_is_a_429_with_retry_after_and_no_request_waits(client, monkeypatch):
    import inspect

    import service

    # The runner BentoML built in this process (to_asgi): let it hold no request at all.
    runner = inspect.getattr_static(service.ChatAPI.inner, "runner").get()
    monkeypatch.setattr(runner.engine, "max_in_flight", 0)
    for stream in (False, True):
        body = {"messages": USER, "max_tokens": 2, "stream": stream}
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 429
        assert resp.json()["error"]["code"] == "model_at_capacity"
        assert resp.headers["retry-after"] == "1"
    assert runner.engine.running + runner.engine.waiting == 0
    monkeypatch.undo()
    assert client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).is_success


def test_cors_is_off_by_default_and_on_for_the_origins_configured(client, monkeypatch):
    from starlette.testclient import TestClient

    import service

    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    default = client.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in default.headers

    monkeypatch.setattr(service.settings, "cors_allow_origins", "https://app.example.com")
    monkeypatch.setattr(service.settings, "api_key", SecretStr("sk-test"))
    with TestClient(service.create_openai_app()) as browser:
        allowed = browser.options("/chat/completions", headers=preflight)
        assert allowed.status_code == 200  # answered before the key check
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        other = browser.options(
            "/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers
        refused = browser.get("/models", headers={"Origin": "https://app.example.com"})
        assert refused.status_code == 401  # CORS does not open the door: the key still counts
        assert refused.headers["access-control-allow-origin"] == "https://app.example.com"


def test_what_the_engine_refuses_is_a_400_and_a_stopped_engine_a_503(client, monkeypatch):
    import inspect

    import service
    from contract.errors import EngineClosedError, EngineRequestError

    runner = inspect.getattr_static(service.ChatAPI.inner, "runner").get()

    def refuse(prompt_ids, params):
        raise EngineRequestError("Not on this engine.", code="unsupported_parameter", param="top_p")

    monkeypatch.setattr(runner.engine, "validate", refuse)
    for stream in (False, True):
        body = {"messages": USER, "max_tokens": 2, "stream": stream}
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert (error["message"], error["code"], error["param"]) == (
            "Not on this engine.", "unsupported_parameter", "top_p",
        )  # fmt: skip

    def stopped(request):
        raise EngineClosedError("the engine is shut down")

    monkeypatch.setattr(runner.engine, "validate", lambda prompt_ids, params: None)
    monkeypatch.setattr(runner.engine, "_submit", stopped)
    for stream in (False, True):
        body = {"messages": USER, "max_tokens": 2, "stream": stream}
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "runner_unavailable"
    monkeypatch.undo()
    assert client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).is_success
