"""The vLLM engine behind the same runner API, served for real: answers equal to the native
engine's, the whole OpenAI surface, cancellation, backpressure, faults and shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import httpx
import openai
import psutil
import pytest

from bench.serving import Target, WorkItem, run_drop
from contract.settings import DEFAULT_MODEL
from logic.protocol import ChatCompletionRequest
from tests.conftest import USER_BENTOML_HOME
from tests.e2e.test_faults import (
    LONG,
    _exit_within,
    assert_failed_fast,
    runner_process,
    start_in_flight,
)
from tests.served import START_HTTP_SERVER, ServedProcess, free_port, scrape
from tests.vllm.conftest import START_TIMEOUT, serve_vllm

# Prompts whose greedy answers are compared token for token with the native engine's.
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 12?",
    "Give me a short tip for learning to cook.",
]


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def _ask(client: openai.OpenAI, prompt: str, **kwargs):
    return client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": prompt}], **kwargs
    )


@pytest.fixture(scope="module")
def client(vllm_split: ServedProcess) -> openai.OpenAI:
    return _client(vllm_split.url)


@pytest.fixture(scope="module")
def native_chat() -> Iterator:
    """The same business logic on the native engine, in this process, with the served
    defaults (not the test settings the root conftest puts in the environment)."""
    from logic.chat import CompletionService
    from logic.model_files import ModelFiles
    from logic.settings import APISettings
    from runners.engine import GenerationEngine

    path = _latest(Path(USER_BENTOML_HOME) / "models" / DEFAULT_MODEL)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    with mock.patch.dict(os.environ, clean, clear=True):
        settings = APISettings()
    engine = GenerationEngine.load(path, device="cpu", dtype="float32")
    loop = asyncio.new_event_loop()
    chat = CompletionService(ModelFiles.load(path), settings, engine.stream)

    def create(**body):
        request = ChatCompletionRequest.model_validate({"model": DEFAULT_MODEL, **body})
        return loop.run_until_complete(chat.create(request))

    yield create
    engine.close()
    loop.close()


def _latest(models_dir: Path) -> str:
    """The store entry `latest` points at (what `bentoml serve` loads)."""
    version = (models_dir / "latest").read_text().strip()
    return str(models_dir / version)


# ---------------------------------------------------------------- the same answers


def test_greedy_answers_match_the_native_engine_token_for_token(client, native_chat):
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ours = native_chat(messages=messages, temperature=0, max_tokens=48)
        theirs = _ask(client, prompt, temperature=0, max_tokens=48)
        assert theirs.choices[0].message.content == ours.choices[0].message.content, prompt
        assert theirs.choices[0].finish_reason == ours.choices[0].finish_reason
        usage = ("prompt_tokens", "completion_tokens", "total_tokens")
        assert [getattr(theirs.usage, f) for f in usage] == [getattr(ours.usage, f) for f in usage]


def test_penalties_and_logprobs_mean_the_same_on_both_engines(client, native_chat):
    prompt = "List the days of the week, then list them again."
    sampling = {"temperature": 0, "max_tokens": 40, "frequency_penalty": 1.5,
                "presence_penalty": 0.5, "logprobs": True, "top_logprobs": 3}  # fmt: skip
    ours = native_chat(messages=[{"role": "user", "content": prompt}], **sampling)
    theirs = _ask(client, prompt, **sampling)
    plain = _ask(client, prompt, temperature=0, max_tokens=40)
    assert theirs.choices[0].message.content == ours.choices[0].message.content
    assert theirs.choices[0].message.content != plain.choices[0].message.content  # it bites
    ours_lp = ours.choices[0].logprobs.content
    theirs_lp = theirs.choices[0].logprobs.content
    assert [e.token for e in theirs_lp] == [e.token for e in ours_lp]
    for mine, other in zip(ours_lp, theirs_lp, strict=True):
        # After penalties (greedy: temperature 1): the same distribution, to float noise.
        assert other.logprob == pytest.approx(mine.logprob, abs=2e-3)
        assert len(other.top_logprobs) == 3
        assert [t.token for t in other.top_logprobs][:1] == [t.token for t in mine.top_logprobs][:1]
        assert other.top_logprobs[0].logprob >= other.top_logprobs[-1].logprob


# ---------------------------------------------------------------- the OpenAI surface


def test_streamed_answer_equals_the_whole_one(client):
    whole = _ask(client, PROMPTS[0], temperature=0, max_tokens=40)
    stream = _ask(
        client, PROMPTS[0], temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    assert text == whole.choices[0].message.content and "Paris" in text
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    streamed_usage = chunks[-1].usage
    assert [getattr(streamed_usage, f) for f in counts] == [getattr(whole.usage, f) for f in counts]
    # The same prompt again: whatever of it was cached the first time is cached now.
    streamed, first = chunks[-1].usage.prompt_tokens_details, whole.usage.prompt_tokens_details
    assert streamed.cached_tokens >= first.cached_tokens


def test_n_choices_are_sampled_and_a_seed_repeats_them(client):
    kwargs = {"temperature": 1.0, "max_tokens": 24, "n": 3, "seed": 7}
    first = _ask(client, "Tell me a short story.", **kwargs)
    again = _ask(client, "Tell me a short story.", **kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert all(texts)
    assert texts == [c.message.content for c in again.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # each choice sampled on its own
    streamed = _ask(client, "Tell me a short story.", stream=True, **kwargs)
    by_choice: dict[int, str] = {}
    for chunk in streamed:
        for choice in chunk.choices:
            by_choice[choice.index] = by_choice.get(choice.index, "") + (choice.delta.content or "")
    assert [by_choice[i] for i in range(3)] == texts


def test_stop_strings_end_the_answer_before_them(client):
    whole = _ask(client, PROMPTS[0], temperature=0, max_tokens=40)
    assert "Paris" in whole.choices[0].message.content
    cut = _ask(client, PROMPTS[0], temperature=0, max_tokens=40, stop=["Paris"])
    assert cut.choices[0].finish_reason == "stop"
    before = whole.choices[0].message.content.split("Paris")[0]
    assert cut.choices[0].message.content == before.rstrip()  # trailing space: the cleanup step


def test_what_vllm_computes_differently_is_a_400_not_a_silent_difference(client):
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(client, PROMPTS[0], temperature=0.7, top_p=0.5, logprobs=True, max_tokens=8)
    error = caught.value.body
    assert error["param"] == "top_p" and error["code"] == "unsupported_parameter"
    # The same request without logprobs, or greedy with logprobs, is served.
    assert _ask(client, PROMPTS[0], temperature=0.7, top_p=0.5, max_tokens=8).choices
    assert _ask(client, PROMPTS[0], temperature=0, top_p=0.5, logprobs=True, max_tokens=8)


def test_a_prompt_past_the_engines_window_is_a_400(client):
    # LLM_VLLM_MAX_MODEL_LEN=4096 is below the model's own window (8192), which the API checks.
    long = "word " * 5000
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(client, long, max_tokens=8)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert _ask(client, PROMPTS[0], temperature=0, max_tokens=8).choices  # still serving


def test_runner_metrics_come_from_vllms_own_stats(vllm_split, client):
    before = scrape(vllm_split.url)
    prefix = "You are a meticulous assistant. " * 150  # the same long system prompt twice
    answers = [
        client.chat.completions.create(
            model=DEFAULT_MODEL, temperature=0, max_tokens=8,
            messages=[{"role": "system", "content": prefix}, {"role": "user", "content": question}],
        )
        for question in ("What is 2+2?", "What is 3+3?")
    ]  # fmt: skip
    after = scrape(vllm_split.url)

    def grew(name: str) -> float:
        return after[(name, ())] - before.get((name, ()), 0.0)

    assert after[("llm_runner_engine_info", (("engine", "vllm"),))] == 1
    assert after[("llm_runner_engine_up", ())] == 1
    assert grew("llm_runner_requests_finished_total") == 2
    assert grew("llm_runner_steps_total") >= 2 * 7  # a prefill and 7 decodes each, at least
    assert grew("llm_runner_decode_tokens_total") >= 2 * 7
    assert grew("llm_runner_busy_seconds_total") > 0
    # The second question reuses the first one's system prompt from the prefix cache (whole
    # KV blocks of it: 128 tokens a block on vLLM's CPU backend).
    queried = grew("llm_runner_prefix_cache_queries_total")
    assert queried >= 2 * 750
    assert grew("llm_runner_prefix_cache_hits_total") >= 512
    # ... and says so in its usage (OpenAI's field), from vLLM's own count.
    cached = answers[1].usage.prompt_tokens_details.cached_tokens
    assert 512 <= cached < answers[1].usage.prompt_tokens
    assert 0 <= after[("llm_runner_kv_cache_usage_ratio", ())] <= 1


# ---------------------------------------------------------------- cancellation and limits


def test_dropped_long_streams_free_the_engine(vllm_split):
    cancelled_before = scrape(vllm_split.url)[("llm_runner_requests_cancelled_total", ())]
    drop = asyncio.run(
        run_drop(
            Target("vllm", f"{vllm_split.url}/v1", DEFAULT_MODEL),
            WorkItem("Explain the water cycle in detail.", 48),
            streams=16,
            tokens=1000,
        )
    )
    assert not drop["errors"], drop
    assert drop["ratio"] <= 2.0, drop  # nobody generates for the 16 that left
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = scrape(vllm_split.url)
        if metrics[("llm_runner_requests_in_flight", ())] == 0:
            break
        time.sleep(0.2)
    assert metrics[("llm_runner_requests_in_flight", ())] == 0
    assert metrics[("llm_runner_requests_cancelled_total", ())] - cancelled_before >= 16


def test_overload_is_a_429_model_at_capacity(vllm_split):
    body = {"messages": LONG, "max_tokens": 200, "temperature": 0, "stream": True}
    statuses: list[int] = []
    codes: list[str] = []

    def one() -> None:
        with httpx.stream(
            "POST", f"{vllm_split.url}/v1/chat/completions", json=body, timeout=120
        ) as response:
            statuses.append(response.status_code)
            response.read()  # a stream read to its end holds its place in the runner
            if response.status_code == 429:
                codes.append(response.json()["error"]["code"])
                assert response.headers["retry-after"]

    refused_before = scrape(vllm_split.url)[("llm_runner_requests_refused_total", ())]
    threads = [threading.Thread(target=one) for _ in range(32)]  # the runner holds 16
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    refused = scrape(vllm_split.url)[("llm_runner_requests_refused_total", ())] - refused_before
    assert len(statuses) == 32 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 8 and set(codes) == {"model_at_capacity"}, (statuses, refused)
    assert refused == statuses.count(429)  # each 429 is a refusal the runner counted
    assert statuses.count(200) >= 8


# ---------------------------------------------------------------- the monolith


def test_the_monolith_serves_the_same_answers_on_vllm(client):
    with serve_vllm("Monolith") as monolith:
        mono = _client(monolith.url)
        for prompt in PROMPTS[:3]:
            one = _ask(mono, prompt, temperature=0, max_tokens=32).choices[0].message.content
            other = _ask(client, prompt, temperature=0, max_tokens=32).choices[0].message.content
            assert one == other
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in _ask(mono, PROMPTS[0], temperature=0, max_tokens=32, stream=True)
            if c.choices
        )
        assert "Paris" in streamed
        metrics = scrape(monolith.url)
        assert metrics[("llm_runner_engine_info", (("engine", "vllm"),))] == 1


def test_the_remote_topology_runs_an_api_that_does_not_know_the_engine():
    """The runner alone on vLLM, the API alone pointed at its URL, as on two hosts; the API's
    environment does not say which engine runs behind it."""
    runner = serve_vllm("ChatAPI")
    runner.command = [*START_HTTP_SERVER, "service:ChatAPI", "--service-name", "LLMRunner",
                      *runner.command[-4:]]  # fmt: skip
    with runner:
        api_env = {k: v for k, v in runner.env.items() if not k.startswith("LLM_")}
        api_env["LLM_API_WORKERS"] = "1"
        api = ServedProcess(
            [*START_HTTP_SERVER, "service:ChatAPI", "--depends", f"LLMRunner={runner.url}"],
            port=free_port(),
            env=api_env,
            start_timeout=START_TIMEOUT,
        )
        with api:
            answer = _ask(_client(api.url), PROMPTS[0], temperature=0, max_tokens=16)
            assert "Paris" in answer.choices[0].message.content
        metrics = scrape(runner.url)
        assert metrics[("llm_runner_engine_info", (("engine", "vllm"),))] == 1
        assert metrics[("llm_runner_requests_finished_total", ())] >= 1


# ---------------------------------------------------------------- faults and shutdown


def _wait_ready(url: str, timeout: float = START_TIMEOUT) -> bool:
    """Whether ``url``'s /readyz went false and then true again within ``timeout``."""
    saw_unready, deadline = False, time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/readyz", timeout=5).status_code
        saw_unready |= status == 503
        if status == 200 and saw_unready:
            return True
        time.sleep(0.5)
    return False


# Answers long enough to still run when the last of them reaches the runner: CI saw one
# request trail the others (once no first token in 60 s; once a stream still running when
# the others, up to 1000 tokens each, were done). The kills come as soon as all are held.
IN_FLIGHT_TOKENS = 3000


def test_a_killed_runner_or_a_dead_engine_fails_requests_fast_and_health_says_so():
    with serve_vllm("ChatAPI") as split:
        # 1. The runner process killed mid-answer: 503s within seconds, and `bentoml serve`
        #    starts a new runner, vLLM and all; the API serves again without a restart.
        first = runner_process(split)
        helpers = first.children(recursive=True)  # vLLM's engine core and its worker
        assert any("EngineCore" in p.name() for p in helpers), [p.name() for p in helpers]
        threads, streams, whole = start_in_flight(split, 2, IN_FLIGHT_TOKENS)
        killed = time.monotonic()
        first.kill()
        assert_failed_fast(threads, streams, whole, killed, within=10)
        assert httpx.get(f"{split.url}/livez", timeout=5).status_code == 200  # the API lives
        assert _wait_ready(split.url), "/readyz never went false, then true again"
        answer = _ask(_client(split.url), PROMPTS[0], temperature=0, max_tokens=16)
        assert "Paris" in answer.choices[0].message.content
        # The killed runner's vLLM processes did not outlive it (on a GPU, its worker holds
        # the model's memory).
        gone = psutil.wait_procs(helpers, timeout=30)[1]
        assert not gone, f"left running: {[p.cmdline() for p in gone]}"

        # 2. vLLM's engine core dies under a live runner: requests in flight get 503s, the
        #    runner's /livez and /readyz fail (an orchestrator restarts it), and so does the
        #    API's /readyz; a new request is a 503 too, not a hang.
        runner = runner_process(split)
        threads, streams, whole = start_in_flight(split, 2, IN_FLIGHT_TOKENS)
        (core,) = [p for p in runner.children(recursive=True) if "EngineCore" in p.name()]
        killed = time.monotonic()
        core.kill()
        assert_failed_fast(threads, streams, whole, killed, within=10)
        deadline = time.monotonic() + 30
        while httpx.get(f"{split.url}/readyz", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/readyz stayed true with a dead engine"
            time.sleep(0.5)
        assert httpx.get(f"{split.url}/livez", timeout=5).status_code == 200
        # The runner's own view (what its /livez and /readyz answer from), on the API's page.
        assert scrape(split.url)[("llm_runner_engine_up", ())] == 0
        after = httpx.post(
            f"{split.url}/v1/chat/completions",
            json={"messages": LONG, "max_tokens": 8}, timeout=30,
        )  # fmt: skip
        assert after.status_code == 503 and after.json()["error"]["code"] == "runner_unavailable"


def test_sigterm_drains_answers_in_flight_then_exits():
    with serve_vllm("ChatAPI", "--timeout-graceful-shutdown", "180") as served:
        # Both in the runner before the signal (start_in_flight waits for it): the whole
        # answer has no first token to wait for, and one still on its way to the runner when
        # the signal comes is refused there (CI saw its 503 once), not drained. 300 tokens:
        # about 25 s here, long enough for both to be seen held (with 60, CI once saw the
        # whole answer done before the test had seen both held), short enough to drain.
        threads, (stream,), whole = start_in_flight(served, 1, 300)
        processes = served.process.children(recursive=True)
        os.kill(served.proc.pid, signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(httpx.TransportError):  # no new requests
            httpx.post(f"{served.url}/v1/models", timeout=5)
        for thread in threads:
            thread.join(180)
        assert stream.error is None and json.loads(stream.events[-2][1])["choices"][0][
            "finish_reason"
        ] in ("length", "stop")
        assert stream.events[-1][1] == "[DONE]"
        assert whole.status == 200
        assert _exit_within(served, 180) < 180
        gone = psutil.wait_procs(processes, timeout=30)[1]
        assert not gone, f"left running: {[p.cmdline() for p in gone]}"


# ---------------------------------------------------------------- structured outputs


def test_structured_outputs_parse_on_vllm_too(client):
    """The same dozen pydantic models as on the native engine (tests/e2e/test_structured),
    through vLLM's own structured outputs."""
    from tests.e2e.test_structured import BUDGET, CASES

    for model, prompt in CASES:
        completion = client.chat.completions.parse(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": prompt}],
            response_format=model, max_tokens=BUDGET, temperature=0,
        )  # fmt: skip
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", (model.__name__, choice.message.content)
        assert isinstance(choice.message.parsed, model)
        assert "\n" not in choice.message.content  # compact, as on the native engine
    bad = {"type": "string", "pattern": "(?<=a)b"}  # no grammar engine compiles a lookbehind
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, "Hi", max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": bad}})  # fmt: skip
    assert info.value.body["param"] == "response_format"


# ---------------------------------------------------------------- tool calls


def test_tool_calls_on_vllm_too(client):
    """Every tool-choice mode, a history with a tool result, and streamed calls reassembled,
    as on the native engine (tests/e2e/test_tools): vLLM decodes under the same structural
    tag, with its own xgrammar."""
    from tests.e2e import test_tools as tools

    for choice in ("required", {"type": "function", "function": {"name": "get_forecast"}}):
        for parallel in (True, False):
            tools.test_required_and_named_choices_always_call_with_valid_arguments(
                client, choice, parallel
            )
    tools.test_auto_answers_in_text_or_calls_as_the_model_chooses(client)
    tools.test_tool_choice_none_answers_in_text(client)
    tools.test_streamed_calls_reassemble_to_the_whole_answer(client)
    tools.test_a_history_with_tool_results_is_read_and_answered(client)
    # A tool schema no grammar engine compiles: a 400 that names the tools.
    bad = tools.function("f", "", {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(?<=a)b"}}})  # fmt: skip
    with pytest.raises(openai.BadRequestError) as info:
        tools.ask(client, tools=[bad], tool_choice="required", max_tokens=8)
    assert info.value.body["param"] == "tools"


def test_free_answers_do_not_change_beside_constrained_ones(client):
    """A batch mixing free requests with structured and tool-call ones: the free answers are
    the ones they get alone (vLLM masks only the constrained rows)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.e2e import test_tools as tools
    from tests.e2e.test_structured import CASES

    prompts = PROMPTS[:2]
    alone = [_ask(client, p, temperature=0, max_tokens=48).choices[0].message.content
             for p in prompts]  # fmt: skip
    model, question = CASES[0]
    with ThreadPoolExecutor(6) as pool:
        calls = [pool.submit(tools.ask, client, tool_choice="required") for _ in range(2)]
        parsed = pool.submit(
            client.chat.completions.parse, model=DEFAULT_MODEL, response_format=model,
            messages=[{"role": "user", "content": question}], max_tokens=300, temperature=0,
        )  # fmt: skip
        free = [pool.submit(_ask, client, p, temperature=0, max_tokens=48) for p in prompts]
        together = [f.result().choices[0].message.content for f in free]
        for call in calls:
            message = call.result().choices[0].message
            tools.assert_valid_calls(message.tool_calls, set(tools.SCHEMAS))
        assert isinstance(parsed.result().choices[0].message.parsed, model)
    assert together == alone


def test_structured_answers_are_closed_within_their_budget_on_vllm_too(client, native_chat):
    """The closing guard over vLLM's stream (runners/closing.py): what loops or runs out of
    tokens is closed validly, whole and streamed; a budget no answer fits is a 422 that says
    it was cut; a named tool is called once. Greedy, the closed answer is the native
    engine's, token for token."""
    from tests.e2e import test_structured as structured

    for budget in (300, 60):
        structured.test_an_answer_that_loops_is_closed_validly_within_its_budget(client, budget)
    structured.test_a_streamed_json_object_is_closed_within_its_budget(client)
    structured.test_a_budget_too_small_for_any_valid_answer_is_a_422_that_says_it_was_cut(client)
    body = {
        "messages": [{"role": "user", "content": "List two planets as JSON."}],
        "response_format": {"type": "json_object"}, "max_tokens": 40, "temperature": 0,
    }  # fmt: skip
    ours = _ask(client, body["messages"][0]["content"], **{k: v for k, v in body.items()
                                                          if k != "messages"})  # fmt: skip
    native = native_chat(**body)
    assert ours.choices[0].message.content == native.choices[0].message.content
    assert ours.usage.completion_tokens == native.usage.completion_tokens <= 40
