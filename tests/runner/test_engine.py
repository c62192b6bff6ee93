"""The runner's engine on a tiny random Llama: exact, reproducible, batched, cancellable."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import torch

from contract.errors import EngineBusyError, EngineClosedError
from contract.tokens import GenerationChunk, SamplingParams
from runners.batch_model import PagedLlama, SequentialHF
from runners.engine import GenerationEngine

# `make gpu-check` runs these tests on CUDA (LLM_TEST_DEVICE=cuda); CI runs them on the CPU.
DEVICE = os.environ.get("LLM_TEST_DEVICE", "cpu")
PROMPT = [1, 40, 41, 42, 43, 44, 45, 2, 1, 50]
# Mixed prompt lengths and budgets, so requests join and leave the batch at different steps.
MIXED = [
    ([1, 60, 61, 62], 30),
    (PROMPT, 12),
    ([1] + list(range(100, 160)) + [2, 1], 25),
    ([7, 8], 5),
    ([1] + list(range(200, 230)), 18),
]


def greedy(max_new_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **extra)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> GenerationEngine:
    engine = GenerationEngine.load(tiny_model_dir, device=DEVICE, dtype="float32")
    yield engine
    engine.close()


async def collect(engine: GenerationEngine, prompt, params) -> tuple[list[int], str | None]:
    ids, finish = [], None
    async for chunk in engine.stream(prompt, params):
        ids += chunk.token_ids
        finish = chunk.finish_reason
    return ids, finish


def generate(engine: GenerationEngine, prompt: list[int], **params) -> tuple[list[int], str]:
    return asyncio.run(collect(engine, prompt, SamplingParams(**params)))


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def test_the_llama_model_runs_on_the_native_batched_path(engine):
    assert isinstance(engine.batch_model, PagedLlama)


def test_greedy_matches_transformers_generate(engine):
    ids, finish = generate(engine, PROMPT, max_new_tokens=20, temperature=0.0)
    reference = engine.model.generate(
        torch.tensor([PROMPT], device=engine.device),
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=None,
    )[0, len(PROMPT) :].tolist()
    assert ids == reference
    assert finish == "length" and len(ids) == 20


def test_greedy_output_is_the_same_alone_and_in_a_batch_of_mixed_lengths(engine):
    alone = [generate(engine, p, max_new_tokens=n, temperature=0.0) for p, n in MIXED]

    async def together():
        tasks = []
        for prompt, budget in MIXED:  # staggered: each joins a batch already decoding
            tasks.append(asyncio.create_task(collect(engine, prompt, greedy(budget))))
            await asyncio.sleep(0.005)
        return await asyncio.gather(*tasks)

    steps_before = engine.stats.steps
    engine.stats.max_running = 0  # a high-water mark: earlier tests raised it
    batched = asyncio.run(together())
    assert batched == alone
    assert engine.stats.max_running > 1  # they really shared steps
    assert engine.stats.steps - steps_before < sum(n for _, n in MIXED)


def test_busy_time_counts_steps_and_not_the_idle_wait_between_them(engine):
    busy_before, started = engine.stats.busy_seconds, time.perf_counter()
    asyncio.run(collect(engine, PROMPT, greedy(8)))
    time.sleep(0.3)  # idle: the engine waits for work, which is not busy time
    busy = engine.stats.busy_seconds - busy_before
    wall = time.perf_counter() - started
    assert 0 < busy < wall - 0.3


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
    first, _ = generate(engine, PROMPT, **params.model_dump())
    other, _ = generate(engine, PROMPT, **{**params.model_dump(), "seed": 4321})
    assert first != other

    async def run():
        noise = SamplingParams(max_new_tokens=24, temperature=1.0)
        return await asyncio.gather(
            collect(engine, PROMPT[:4], noise),
            collect(engine, PROMPT, params),
            collect(engine, PROMPT[2:], noise),
            collect(engine, [5, 6, 7], greedy(10)),
        )

    assert asyncio.run(run())[1][0] == first


def test_stop_token_ends_with_reason_stop(engine):
    ids, _ = generate(engine, PROMPT, max_new_tokens=10, temperature=0.0)
    stop_at = ids[3]
    out, finish = generate(
        engine, PROMPT, max_new_tokens=10, temperature=0.0, stop_token_ids=[stop_at]
    )
    assert finish == "stop"
    assert out == ids[: ids.index(stop_at) + 1]


def test_generation_stops_at_the_context_window(engine):
    prompt = [40] * (engine.context_length - 5)
    ids, finish = generate(engine, prompt, max_new_tokens=100, temperature=0.0)
    assert finish == "length"
    assert len(prompt) + len(ids) <= engine.context_length


def test_a_closed_stream_leaves_the_batch_and_frees_its_slot(engine):
    async def run():
        keep = asyncio.create_task(collect(engine, PROMPT, greedy(60)))
        stream = engine.stream(PROMPT, greedy(200))
        first = await anext(stream)
        await stream.aclose()
        await wait_until(lambda: engine.running <= 1)
        ids, finish = await keep  # the other request is untouched
        await wait_until(lambda: engine.running == 0)
        return first, ids, finish

    cancelled = engine.stats.cancelled
    first, ids, finish = asyncio.run(run())
    assert first.token_ids and first.finish_reason is None
    assert len(ids) == 60 and finish == "length"
    assert engine.stats.cancelled == cancelled + 1
    assert sorted(engine._free_slots) == list(range(engine.max_batch_size))


def test_many_dropped_streams_leave_the_engine_idle_and_their_blocks_returned(engine):
    pool = engine.blocks

    async def run():
        streams = [engine.stream([1, 50 + i, 60 + i], greedy(1000)) for i in range(16)]
        for stream in streams:
            await anext(stream)
        held = pool.used_blocks
        for stream in streams:
            await stream.aclose()
        await wait_until(lambda: engine.running == 0 and engine.waiting == 0)
        return held

    assert asyncio.run(run()) >= 16  # each stream held a block at least
    assert pool.used_blocks == 0 and pool.available == pool.num_blocks - 1
    ids, finish = generate(engine, PROMPT, max_new_tokens=5, temperature=0.0)
    assert len(ids) == 5 and finish == "length"


def test_more_requests_than_slots_wait_their_turn(tiny_model_dir):
    small = GenerationEngine.load(
        tiny_model_dir,
        device=DEVICE,
        dtype="float32",
        max_batch_size=2,
        max_batch_tokens=8,
        max_in_flight=len(MIXED),
    )
    step_tokens = []
    real = small.batch_model.forward

    def counting(work):
        step_tokens.append((len(work), sum(len(w.token_ids) for w in work)))
        return real(work)

    small.batch_model.forward = counting
    try:
        alone = [generate(small, p, max_new_tokens=n, temperature=0.0) for p, n in MIXED]
        step_tokens.clear()

        async def run():
            return await asyncio.gather(*(collect(small, p, greedy(n)) for p, n in MIXED))

        assert asyncio.run(run()) == alone
        assert small.stats.max_running == 2
        # Never more than 2 sequences or 8 tokens in a step, and both limits were reached.
        assert max(rows for rows, _ in step_tokens) == 2
        assert max(tokens for _, tokens in step_tokens) == 8
    finally:
        small.close()


def test_beyond_its_in_flight_limit_the_engine_refuses_at_once_and_then_takes_requests_again(
    tiny_model_dir,
):
    small = GenerationEngine.load(
        tiny_model_dir, device=DEVICE, dtype="float32", max_batch_size=2, max_in_flight=3
    )
    try:
        assert small.max_in_flight == 3

        async def run():
            held = [asyncio.create_task(collect(small, PROMPT, greedy(200))) for _ in range(3)]
            await wait_until(lambda: small.running == 2 and small.waiting == 1)
            started = time.monotonic()
            with pytest.raises(EngineBusyError):
                await collect(small, PROMPT, greedy(4))
            refused_in = time.monotonic() - started
            assert small.running + small.waiting == 3  # the refused one queued nowhere
            assert small.stats.refused == 1
            held[0].cancel()  # a client leaves: its place is free again
            await wait_until(lambda: small.running + small.waiting < 3)
            ids, _ = await collect(small, PROMPT, greedy(4))
            for task in held[1:]:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            return refused_in, ids

        refused_in, ids = asyncio.run(run())
        assert refused_in < 0.5 and len(ids) == 4
    finally:
        small.close()

    default = GenerationEngine.load(
        tiny_model_dir, device=DEVICE, dtype="float32", max_batch_size=3
    )
    try:  # by default: a full batch running and one more waiting
        assert default.max_in_flight == 6
    finally:
        default.close()


def test_chunked_prefill_gives_the_same_tokens(engine, tiny_model_dir):
    long_prompt = [1] + list(range(100, 190)) + [2, 1]
    whole, _ = generate(engine, long_prompt, max_new_tokens=12, temperature=0.0)
    chunked = GenerationEngine.load(
        tiny_model_dir, device=DEVICE, dtype="float32", max_batch_tokens=16
    )
    try:
        assert generate(chunked, long_prompt, max_new_tokens=12, temperature=0.0)[0] == whole
        assert chunked.stats.prefill_tokens == len(long_prompt)
        assert chunked.stats.steps >= len(long_prompt) // 16 + 12
    finally:
        chunked.close()


def test_the_transformers_fallback_gives_the_same_greedy_tokens(engine, tiny_model_dir):
    fallback = GenerationEngine.load(
        tiny_model_dir, device=DEVICE, dtype="float32", backend="transformers"
    )
    try:
        assert isinstance(fallback.batch_model, SequentialHF)

        async def run(target):
            return await asyncio.gather(*(collect(target, p, greedy(n)) for p, n in MIXED))

        assert asyncio.run(run(fallback)) == asyncio.run(run(engine))
    finally:
        fallback.close()


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    real = engine.batch_model.forward
    calls = {"n": 0}

    def flaky(work):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device fell over")
        return real(work)

    monkeypatch.setattr(engine.batch_model, "forward", flaky)
    with pytest.raises(RuntimeError, match="generation step failed"):
        generate(engine, PROMPT, max_new_tokens=10, temperature=0.0)
    ids, finish = generate(engine, PROMPT, max_new_tokens=4, temperature=0.0)
    assert len(ids) == 4 and finish == "length"
    assert engine.running == 0


def test_closing_the_engine_fails_waiting_requests(tiny_model_dir):
    closing = GenerationEngine.load(tiny_model_dir, device=DEVICE, dtype="float32")

    async def run():
        stream = closing.stream(PROMPT, greedy(10_000))
        await anext(stream)
        closing.close()
        with pytest.raises(EngineClosedError):
            async for _ in stream:
                pass
        with pytest.raises(EngineClosedError):
            await anext(closing.stream(PROMPT, greedy(2)))

    asyncio.run(run())


@pytest.mark.parametrize("prompt", [[], [10**6], [-1]])
def test_invalid_prompt_ids_are_refused(engine, prompt):
    with pytest.raises(ValueError):
        generate(engine, prompt, max_new_tokens=2)


def test_a_failing_prefill_fails_only_the_new_request(engine, monkeypatch):
    real = engine.batch_model.forward
    expected, _ = generate(engine, PROMPT, max_new_tokens=30, temperature=0.0)

    def refuse_long_prompts(work):
        if any(len(w.token_ids) > 20 for w in work):
            raise RuntimeError("out of memory")
        return real(work)

    monkeypatch.setattr(engine.batch_model, "forward", refuse_long_prompts)

    async def run():
        running = asyncio.create_task(collect(engine, PROMPT, greedy(30)))
        await wait_until(lambda: engine.stats.decode_tokens > 0 and engine.running == 1)
        with pytest.raises(RuntimeError, match="generation step failed"):
            await collect(engine, list(range(100, 150)), greedy(5))
        return await running

    ids, finish = asyncio.run(run())
    assert ids == expected and finish == "length"  # the running request never noticed


def test_a_scheduler_crash_fails_streams_instead_of_hanging(tiny_model_dir, monkeypatch):
    crashing = GenerationEngine.load(tiny_model_dir, device=DEVICE, dtype="float32")

    def broken_schedule():
        raise KeyError("a scheduler bug")

    async def run():
        monkeypatch.setattr(crashing, "_schedule", broken_schedule)
        with pytest.raises(EngineClosedError):
            await asyncio.wait_for(collect(crashing, PROMPT, greedy(5)), timeout=5)
        with pytest.raises(EngineClosedError):  # and later requests are refused at once
            await collect(crashing, PROMPT, greedy(5))

    asyncio.run(run())
    crashing.close()


# ---------------------------------------------------------------- penalties and logprobs


async def collect_logprobs(engine: GenerationEngine, prompt, params) -> tuple[list[int], list]:
    """Token ids and their :class:`TokenLogprob` s (None when the request did not ask)."""
    ids, logprobs = [], []
    async for chunk in engine.stream(prompt, params):
        ids += chunk.token_ids
        if chunk.logprobs is None:
            logprobs = None
        else:
            assert len(chunk.logprobs) == len(chunk.token_ids)
            logprobs += chunk.logprobs
    return ids, logprobs


def reference_logits(engine: GenerationEngine, prompt: list[int], generated: list[int]):
    """The transformers model's next-token logits after ``prompt + generated``."""
    with torch.no_grad():
        ids = torch.tensor([prompt + generated], device=engine.device)
        return engine.model(ids).logits[0, -1].float().cpu()


def repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


def test_a_frequency_penalty_makes_greedy_output_repeat_less(engine):
    plain, _ = generate(engine, PROMPT, max_new_tokens=30, temperature=0.0)
    assert repeats(plain) > 0  # the tiny model loops, so there is something to penalize
    penalized, finish = generate(
        engine, PROMPT, max_new_tokens=30, temperature=0.0, frequency_penalty=2.0
    )
    assert finish == "length" and len(penalized) == 30
    assert penalized != plain
    assert repeats(penalized) < repeats(plain)


@pytest.mark.parametrize(
    ("presence", "frequency"), [(1.5, 0.0), (0.0, 0.7), (0.4, 0.3), (-0.5, 0.0)]
)
def test_penalties_by_hand_on_transformers_logits_give_the_same_greedy_tokens(
    engine, presence, frequency
):
    params = greedy(12, presence_penalty=presence, frequency_penalty=frequency)
    ids, _ = asyncio.run(collect(engine, PROMPT, params))
    generated: list[int] = []
    for _ in range(len(ids)):
        logits = reference_logits(engine, PROMPT, generated)
        for token in set(generated):
            logits[token] -= presence + frequency * generated.count(token)
        generated.append(int(torch.argmax(logits)))
    assert ids == generated


def test_greedy_logprobs_are_the_log_softmax_of_the_logits(engine):
    params = greedy(10, logprobs=True, top_logprobs=5)
    ids, logprobs = asyncio.run(collect_logprobs(engine, PROMPT, params))
    assert len(logprobs) == len(ids) == 10
    for step, (token, entry) in enumerate(zip(ids, logprobs, strict=True)):
        expected = torch.log_softmax(reference_logits(engine, PROMPT, ids[:step]), dim=-1)
        assert entry.token_id == token
        torch.testing.assert_close(torch.tensor(entry.logprob), expected[token], atol=1e-4, rtol=0)
        assert len(entry.top) == 5
        top_ids = [t for t, _ in entry.top]
        top_values = [v for _, v in entry.top]
        assert top_ids[0] == token  # greedy: the best is the one chosen
        assert top_values == sorted(top_values, reverse=True)
        torch.testing.assert_close(torch.tensor(top_values), expected[top_ids], atol=1e-4, rtol=0)


def test_logprobs_follow_penalties_and_temperature(engine):
    params = SamplingParams(
        max_new_tokens=8, temperature=0.7, seed=7, frequency_penalty=1.0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    ids, logprobs = asyncio.run(collect_logprobs(engine, PROMPT, params))
    for step, (token, entry) in enumerate(zip(ids, logprobs, strict=True)):
        logits = reference_logits(engine, PROMPT, ids[:step])
        for seen in set(ids[:step]):
            logits[seen] -= 1.0 * ids[:step].count(seen)
        expected = torch.log_softmax(logits / 0.7, dim=-1)
        torch.testing.assert_close(torch.tensor(entry.logprob), expected[token], atol=1e-4, rtol=0)
        assert [t for t, _ in entry.top] == expected.topk(3).indices.tolist()


def test_no_top_logprobs_gives_the_chosen_token_only(engine):
    ids, logprobs = asyncio.run(collect_logprobs(engine, PROMPT, greedy(4, logprobs=True)))
    assert [entry.token_id for entry in logprobs] == ids
    assert all(entry.top == [] and entry.logprob <= 0.0 for entry in logprobs)
    plain, none = asyncio.run(collect_logprobs(engine, PROMPT, greedy(4)))
    assert plain == ids and none is None


def test_coalesced_chunks_keep_one_logprob_per_token(engine):
    async def run():
        chunks = []
        async for chunk in engine.stream(PROMPT, greedy(12, logprobs=True, top_logprobs=2)):
            chunks.append(chunk)
            await asyncio.sleep(0.05)  # fall behind, so later chunks carry several tokens
        return chunks

    chunks = asyncio.run(run())
    assert any(len(chunk.token_ids) > 1 for chunk in chunks)
    for chunk in chunks:
        assert [entry.token_id for entry in chunk.logprobs] == chunk.token_ids
    alone, logprobs = asyncio.run(
        collect_logprobs(engine, PROMPT, greedy(12, logprobs=True, top_logprobs=2))
    )
    assert [t for chunk in chunks for t in chunk.token_ids] == alone
    assert [e for chunk in chunks for e in chunk.logprobs] == logprobs


# Penalized and logprob requests beside plain ones, greedy and seeded.
EXTRAS = [
    (PROMPT, greedy(16, logprobs=True, top_logprobs=4)),
    (PROMPT, greedy(16)),
    ([1, 60, 61, 62], greedy(20, frequency_penalty=1.2, logprobs=True)),
    ([7, 8], greedy(14, presence_penalty=0.8)),
    (
        [1] + list(range(100, 140)),
        SamplingParams(
            max_new_tokens=18,
            temperature=0.9,
            top_p=0.95,
            seed=3,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            logprobs=True,
            top_logprobs=2,
        ),
    ),  # fmt: skip
    ([5, 6, 7], SamplingParams(max_new_tokens=10, temperature=1.0, seed=11)),
]


def test_penalties_and_logprobs_are_the_same_alone_and_batched(engine):
    alone = [asyncio.run(collect_logprobs(engine, p, params)) for p, params in EXTRAS]

    async def together():
        tasks = []
        for prompt, params in EXTRAS:  # staggered: each joins a batch already decoding
            tasks.append(asyncio.create_task(collect_logprobs(engine, prompt, params)))
            await asyncio.sleep(0.005)
        return await asyncio.gather(*tasks)

    engine.stats.max_running = 0  # a high-water mark: earlier tests raised it
    batched = asyncio.run(together())
    assert engine.stats.max_running > 1
    for (ids, logprobs), (alone_ids, alone_logprobs) in zip(batched, alone, strict=True):
        assert ids == alone_ids
        if alone_logprobs is None:
            assert logprobs is None
            continue
        for entry, reference in zip(logprobs, alone_logprobs, strict=True):
            assert entry.token_id == reference.token_id
            assert [t for t, _ in entry.top] == [t for t, _ in reference.top]
            torch.testing.assert_close(
                torch.tensor([entry.logprob] + [v for _, v in entry.top]),
                torch.tensor([reference.logprob] + [v for _, v in reference.top]),
                atol=1e-4, rtol=0,
            )  # fmt: skip
    # The plain greedy request beside them is what it is on its own.
    assert batched[1][0] == generate(engine, PROMPT, max_new_tokens=16, temperature=0.0)[0]


def test_the_runner_api_passes_penalties_and_logprobs_and_keeps_plain_lines_small(engine):
    pytest.importorskip("bentoml", reason="the GPU check's machine has no BentoML")
    from runners.llm import LLMRunner

    runner = object.__new__(LLMRunner.inner)  # no BentoML model store: the engine is ours
    runner.engine = engine

    async def lines(**params):
        return [line async for line in runner.generate(prompt_ids=PROMPT, **params)]

    plain = asyncio.run(lines(max_new_tokens=3, temperature=0.0))
    assert all("logprobs" not in line for line in plain)
    assert '"finish_reason"' not in plain[0] and '"finish_reason":"length"' in plain[-1]
    asked = asyncio.run(
        lines(max_new_tokens=3, temperature=0.0, frequency_penalty=2.0, logprobs=True,
              top_logprobs=2)
    )  # fmt: skip
    chunks = [GenerationChunk.model_validate_json(line) for line in asked]
    ids = [t for chunk in chunks for t in chunk.token_ids]
    assert ids == generate(engine, PROMPT, **greedy(3, frequency_penalty=2.0).model_dump())[0]
    assert all(len(entry.top) == 2 for chunk in chunks for entry in chunk.logprobs)
