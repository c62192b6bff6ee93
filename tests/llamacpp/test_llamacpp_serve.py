"""The llama.cpp engine behind the same runner API, served for real with `bentoml serve` and
the openai client: answers close to the native engine's, the OpenAI surface, structured
outputs and tools, prefix reuse on /metrics, cancellation, overload, a killed runner, the
monolith and the remote topology."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from bench.serving import Target, WorkItem, run_drop
from contract.settings import DEFAULT_MODEL
from tests.e2e.test_faults import LONG, assert_failed_fast, runner_process, start_in_flight
from tests.llamacpp.conftest import START_TIMEOUT, serve_llamacpp
from tests.served import START_HTTP_SERVER, ServedProcess, free_port, scrape

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
def client(llamacpp_split: ServedProcess) -> openai.OpenAI:
    return _client(llamacpp_split.url)


# ---------------------------------------------------------------- the model


def test_it_answers_with_the_default_model(client):
    """The served answers come from the GGUF (test_llamacpp_engine compares the engine's
    greedy answers with the native engine's; the monolith test below, split with monolith)."""
    answer = _ask(client, PROMPTS[0], temperature=0, max_tokens=32)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------- the OpenAI surface


def test_streamed_answer_equals_the_whole_one(client):
    whole = _ask(client, PROMPTS[0], temperature=0, max_tokens=40)
    stream = _ask(
        client, PROMPTS[0], temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and "Paris" in text
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(chunks[-1].usage, f) for f in counts] == [
        getattr(whole.usage, f) for f in counts
    ]
    # The same prompt again: all of it but its last token came from llama.cpp's cells.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


def test_n_choices_are_sampled_and_a_seed_repeats_them(client):
    kwargs = {"temperature": 1.0, "max_tokens": 24, "n": 3, "seed": 7}
    # The first ask computes the prompt in one step; later ones copy it back from host memory
    # and compute its last token alone: kernels of another shape, so logits a rounding apart,
    # and a sampled near-tie may part from the first ask's (docs/engines.md). From the same
    # state, the same seed gives the same choices.
    first = _ask(client, "Tell me a short story.", **kwargs)
    again = _ask(client, "Tell me a short story.", **kwargs)
    third = _ask(client, "Tell me a short story.", **kwargs)
    other = _ask(client, "Tell me a short story.", **{**kwargs, "seed": 8})
    texts = [c.message.content for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and all(texts)
    assert all(c.message.content for c in first.choices)
    assert texts == [c.message.content for c in third.choices]
    assert texts != [c.message.content for c in other.choices]
    assert len(set(texts)) > 1


def test_stops_penalties_and_logprobs(client):
    whole = _ask(client, PROMPTS[0], temperature=0, max_tokens=40)
    cut = _ask(client, PROMPTS[0], temperature=0, max_tokens=40, stop=["Paris"])
    assert cut.choices[0].finish_reason == "stop"
    assert (
        cut.choices[0].message.content
        == whole.choices[0].message.content.split("Paris")[0].rstrip()
    )
    prompt = "List the days of the week, then list them again."
    plain = _ask(client, prompt, temperature=0, max_tokens=40)
    penalized = _ask(client, prompt, temperature=0, max_tokens=40, frequency_penalty=1.5,
                     logprobs=True, top_logprobs=3)  # fmt: skip
    assert penalized.choices[0].message.content != plain.choices[0].message.content
    for entry in penalized.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0


def test_runner_metrics_say_llamacpp_and_count_the_reused_prefix(llamacpp_split, client):
    before = scrape(llamacpp_split.url)
    prefix = "You are a meticulous assistant. " * 150
    answers = [
        client.chat.completions.create(
            model=DEFAULT_MODEL, temperature=0, max_tokens=8,
            messages=[{"role": "system", "content": prefix}, {"role": "user", "content": q}],
        )
        for q in ("What is 2+2?", "What is 3+3?")
    ]  # fmt: skip
    after = scrape(llamacpp_split.url)

    def grew(name: str) -> float:
        return after[(name, ())] - before.get((name, ()), 0.0)

    assert after[("llm_runner_engine_info", (("engine", "llamacpp"),))] == 1
    assert after[("llm_runner_engine_up", ())] == 1
    assert grew("llm_runner_requests_finished_total") == 2
    assert grew("llm_runner_decode_tokens_total") >= 2 * 7
    cached = answers[1].usage.prompt_tokens_details.cached_tokens
    assert 750 <= cached < answers[1].usage.prompt_tokens  # the system prompt, to the token
    assert grew("llm_runner_prefix_cache_hits_total") >= cached


def test_prompts_asked_before_come_back_from_host_memory(llamacpp_split, client):
    """No finished sequence stays in llama.cpp's cells by default (each would slow every
    step): it goes to host memory, and a prompt asked again gets all but its last token back
    from there, however many others came between."""
    for prompt in PROMPTS:
        _ask(client, prompt, temperature=0, max_tokens=4)
    before = scrape(llamacpp_split.url)
    for prompt in PROMPTS:
        again = _ask(client, prompt, temperature=0, max_tokens=4)
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    after = scrape(llamacpp_split.url)
    restores = ("llm_runner_host_cache_restores_total", ())
    assert after[restores] - before.get(restores, 0.0) == len(PROMPTS)
    assert after[("llm_runner_host_cache_sequences", ())] >= len(PROMPTS)
    assert after[("llm_runner_host_cache_bytes", ())] > 0


# ---------------------------------------------------------------- structured outputs, tools


def test_structured_outputs_and_tool_calls_stay_constrained(client):
    from tests.e2e import test_structured as structured
    from tests.e2e import test_tools as tools
    from tests.e2e.test_structured import BUDGET, CASES

    for model, prompt in CASES:
        completion = client.chat.completions.parse(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": prompt}],
            response_format=model, max_tokens=BUDGET, temperature=0,
        )  # fmt: skip
        assert isinstance(completion.choices[0].message.parsed, model), model.__name__
    structured.test_an_answer_that_loops_is_closed_validly_within_its_budget(client, 60)
    structured.test_a_budget_too_small_for_any_valid_answer_is_a_422_that_says_it_was_cut(client)
    tools.test_required_and_named_choices_always_call_with_valid_arguments(client, "required", True)
    tools.test_streamed_calls_reassemble_to_the_whole_answer(client)


def test_the_runner_on_llamacpp_never_loads_torch(llamacpp_split, client):
    """Sampling, penalties, logprobs and a grammar, each served, and the runner's process has
    mapped xgrammar's library and llama.cpp's, never torch's (215 MiB it would keep)."""
    answer = _ask(
        client, PROMPTS[2], max_tokens=16, temperature=0.9, seed=3, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, logprobs=True, top_logprobs=2,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert answer.choices[0].logprobs.content[0].top_logprobs
    runner = runner_process(llamacpp_split)
    maps = Path(f"/proc/{runner.pid}/maps").read_text()
    assert "libllama" in maps and "libxgrammar_bindings" in maps
    assert "libtorch" not in maps and "/torch/" not in maps


# ---------------------------------------------------------------- cancellation and limits


def test_dropped_long_streams_free_the_engine(llamacpp_split):
    cancelled_before = scrape(llamacpp_split.url)[("llm_runner_requests_cancelled_total", ())]
    drop = asyncio.run(
        run_drop(
            Target("llamacpp", f"{llamacpp_split.url}/v1", DEFAULT_MODEL),
            WorkItem("Explain the water cycle in detail.", 48),
            streams=16,
            tokens=1000,
        )
    )
    assert not drop["errors"], drop
    assert drop["ratio"] <= 2.0, drop
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = scrape(llamacpp_split.url)
        if metrics[("llm_runner_requests_in_flight", ())] == 0:
            break
        time.sleep(0.2)
    assert metrics[("llm_runner_requests_in_flight", ())] == 0
    assert metrics[("llm_runner_requests_cancelled_total", ())] - cancelled_before >= 16


def test_overload_is_a_429_model_at_capacity(llamacpp_split):
    body = {"messages": LONG, "max_tokens": 200, "temperature": 0, "stream": True}
    statuses: list[int] = []
    codes: list[str] = []

    def one() -> None:
        url = f"{llamacpp_split.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=120) as response:
            statuses.append(response.status_code)
            response.read()
            if response.status_code == 429:
                codes.append(response.json()["error"]["code"])

    threads = [threading.Thread(target=one) for _ in range(32)]  # the runner holds 16
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(statuses) == 32 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 8 and set(codes) == {"model_at_capacity"}
    assert statuses.count(200) >= 8


# ---------------------------------------------------------------- topologies and faults


def test_the_monolith_serves_the_same_answers_on_llamacpp():
    """One process or two, the same answers. Both start fresh and get the same prompts in the
    same order: on llama.cpp a greedy answer may change with the shape of the steps that
    computed its prompt, and the chat template's system prompt, reused from the cells after
    the first request, is such a change (docs/engines.md). A split server that had answered
    other prompts before (the shared one) computed that prefix in other steps, and a near-tie
    may part (it did, on an AMD EPYC in CI)."""
    prompts = ("Name a famous bridge.", "What do bees make?", "Say hello in French.")
    answers = {}
    for service in ("ChatAPI", "Monolith"):
        with serve_llamacpp(service) as served:
            client = _client(served.url)
            answers[service] = [
                _ask(client, p, temperature=0, max_tokens=32).choices[0].message.content
                for p in prompts
            ]
            metrics = scrape(served.url)
            assert metrics[("llm_runner_engine_info", (("engine", "llamacpp"),))] == 1
    assert answers["Monolith"] == answers["ChatAPI"]
    assert all(answers["Monolith"]), answers


def test_the_remote_topology_runs_an_api_that_does_not_know_the_engine():
    runner = serve_llamacpp("ChatAPI")
    runner.command = [*START_HTTP_SERVER, "service:ChatAPI", "--service-name", "LLMRunner",
                      *runner.command[-4:]]  # fmt: skip
    with runner:
        api_env = {k: v for k, v in runner.env.items() if not k.startswith("LLM_")}
        api_env["LLM_API_WORKERS"] = "1"
        api = ServedProcess(
            [*START_HTTP_SERVER, "service:ChatAPI", "--depends", f"LLMRunner={runner.url}"],
            port=free_port(), env=api_env, start_timeout=START_TIMEOUT,
        )  # fmt: skip
        with api:
            answer = _ask(_client(api.url), PROMPTS[0], temperature=0, max_tokens=16)
            assert "Paris" in answer.choices[0].message.content
        assert scrape(runner.url)[("llm_runner_engine_info", (("engine", "llamacpp"),))] == 1


def test_a_killed_runner_fails_requests_fast_and_comes_back():
    """llama.cpp runs inside the runner's process: a crash in its kernels is the runner's
    death. Requests in flight get 503s within seconds, `bentoml serve` starts a new runner
    and the API serves again without a restart."""
    with serve_llamacpp("ChatAPI") as split:
        first = runner_process(split)
        threads, streams, whole = start_in_flight(split, 2)
        killed = time.monotonic()
        first.kill()
        assert_failed_fast(threads, streams, whole, killed, within=10)
        assert httpx.get(f"{split.url}/livez", timeout=5).status_code == 200
        deadline = time.monotonic() + START_TIMEOUT
        while httpx.get(f"{split.url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the runner did not come back"
            time.sleep(0.5)
        answer = _ask(_client(split.url), PROMPTS[0], temperature=0, max_tokens=16)
        assert "Paris" in answer.choices[0].message.content
