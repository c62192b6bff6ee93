"""Observability in process: request ids, the API's Prometheus series, the metrics key, and
logs that carry the request id and never a secret."""

from __future__ import annotations

import io
import json
import logging

import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from glue.logs import JSONFormatter

USER = [{"role": "user", "content": "Hello there"}]
CHAT = "/v1/chat/completions"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_client_request_id_is_echoed_and_a_missing_one_is_made(client):
    mine = client.post(
        CHAT, json={"messages": USER, "max_tokens": 2}, headers={"X-Request-ID": "abc-1"}
    )
    assert mine.headers["x-request-id"] == "abc-1"
    made = client.post(CHAT, json={"messages": USER, "max_tokens": 2})
    forged = client.post(CHAT, content=b"{", headers={"X-Request-ID": "bad id\twith tab"})
    assert len(made.headers["x-request-id"]) == 32
    assert forged.status_code == 400 and forged.headers["x-request-id"] != "bad id\twith tab"


def test_requests_are_counted_by_route_and_status(client):
    before = {
        status: sample("llm_api_requests_total", route=CHAT, status=status)
        for status in ("200", "400")
    }
    other = sample("llm_api_requests_total", route="other", status="404")
    invalid = sample("llm_api_errors_total", code="invalid_json")
    client.post(CHAT, json={"messages": USER, "max_tokens": 2})
    client.post(CHAT, json={"messages": USER, "max_tokens": 2, "stream": True})
    client.post(CHAT, content=b"not json")
    client.get("/v1/no/such/route/9f3")
    assert sample("llm_api_requests_total", route=CHAT, status="200") == before["200"] + 2
    assert sample("llm_api_requests_total", route=CHAT, status="400") == before["400"] + 1
    assert sample("llm_api_requests_total", route="other", status="404") == other + 1
    assert sample("llm_api_errors_total", code="invalid_json") == invalid + 1
    assert sample("llm_api_requests_in_flight") == 0


def test_tokens_and_latencies_are_recorded_from_what_the_model_produced(client):
    ttft = sample("llm_api_time_to_first_token_seconds_count")
    itl = sample("llm_api_inter_token_latency_seconds_count")
    prompt = sample("llm_api_prompt_tokens_total")
    completion = sample("llm_api_completion_tokens_total")
    body = {"messages": USER, "max_tokens": 6, "n": 2, "temperature": 1.0, "seed": 3}
    usage = client.post(CHAT, json=body).json()["usage"]
    assert sample("llm_api_prompt_tokens_total") == prompt + usage["prompt_tokens"]
    assert sample("llm_api_completion_tokens_total") == completion + usage["completion_tokens"]
    assert sample("llm_api_time_to_first_token_seconds_count") == ttft + 1  # one per request
    # Tokens after each choice's first chunk are the gaps between tokens (the runner may
    # send a choice's first tokens together).
    gaps = sample("llm_api_inter_token_latency_seconds_count") - itl
    assert 1 <= gaps <= usage["completion_tokens"] - 2


def test_the_metrics_route_shows_the_api_series(client):
    client.post(CHAT, json={"messages": USER, "max_tokens": 2})
    text = client.get("/metrics").text
    for series in (
        "llm_api_requests_total",
        "llm_api_time_to_first_token_seconds_bucket",
        "llm_api_inter_token_latency_seconds_bucket",
        "llm_api_completion_tokens_total",
        "llm_api_requests_in_flight",
    ):
        assert series in text


def test_metrics_can_require_a_key_while_health_stays_open(client, monkeypatch):
    import service

    assert client.get("/metrics").status_code == 200  # open by default
    monkeypatch.setattr(service.settings, "metrics_api_key", SecretStr("scrape-key"))
    refused = client.get("/metrics")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    allowed = client.get("/metrics", headers={"Authorization": "Bearer scrape-key"})
    assert allowed.status_code == 200 and "llm_api_requests_total" in allowed.text
    assert client.get("/livez").status_code == 200 and client.get("/readyz").status_code == 200


@pytest.fixture
def json_log() -> io.StringIO:
    """Everything logged, formatted as served workers format it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter("test"))
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("logic", "service", "runners")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.INFO)
    root.addHandler(handler)
    yield out
    root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_a_generation_is_logged_as_json_under_its_request_id(client, json_log):
    resp = client.post(
        CHAT, json={"messages": USER, "max_tokens": 3}, headers={"X-Request-ID": "trace-77"}
    )
    entries = [json.loads(line) for line in json_log.getvalue().splitlines()]
    ours = [e for e in entries if e.get("request_id") == "trace-77"]
    api = next(e for e in ours if e["logger"] == "logic.chat")
    assert api["outcome"] == "finished"
    assert api["completion_tokens"] == resp.json()["usage"]["completion_tokens"]
    assert api["time_to_first_token_ms"] > 0
    # The runner (built in this process here) logs its side under the same id.
    runner = next(e for e in ours if e["logger"] == "runners.llm")
    assert runner["completion_tokens"] == api["completion_tokens"]


def test_secrets_are_never_logged_or_shown(client, monkeypatch, json_log):
    import service

    key, scrape = "sk-live-0123456789", "scrape-0123456789"
    monkeypatch.setattr(service.settings, "api_key", SecretStr(key))
    monkeypatch.setattr(service.settings, "metrics_api_key", SecretStr(scrape))
    logging.getLogger("service").warning("settings: %s", service.settings)
    logging.getLogger("service").warning("settings: %r", service.settings)
    auth = {"Authorization": f"Bearer {key}"}
    assert client.post(CHAT, json={"messages": USER, "max_tokens": 2}, headers=auth).is_success
    assert (
        client.post(
            CHAT, json={"messages": USER}, headers={"Authorization": "Bearer x"}
        ).status_code
        == 401
    )
    client.get("/metrics", headers={"Authorization": "Bearer x"})
    logged = json_log.getvalue()
    assert "settings:" in logged and "**********" in logged
    assert key not in logged and scrape not in logged
