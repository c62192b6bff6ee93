"""The runner's engine on a tiny random Llama: exact, reproducible, batched, cancellable."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from logic.protocol import SamplingParams
from runners.batch_model import SequentialHF, SlotLlama
from runners.engine import EngineClosedError, GenerationEngine, sample_token

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
    engine = GenerationEngine.load(tiny_model_dir, device="cpu", dtype="float32")
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
    assert isinstance(engine.batch_model, SlotLlama)


def test_greedy_matches_transformers_generate(engine):
    ids, finish = generate(engine, PROMPT, max_new_tokens=20, temperature=0.0)
    reference = engine.model.generate(
        torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False, eos_token_id=None
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
    batched = asyncio.run(together())
    assert batched == alone
    assert engine.stats.max_running > 1  # they really shared steps
    assert engine.stats.steps - steps_before < sum(n for _, n in MIXED)


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


def test_many_dropped_streams_leave_the_engine_idle_and_memory_trimmed(engine):
    async def run():
        streams = [engine.stream([1, 50 + i, 60 + i], greedy(1000)) for i in range(16)]
        for stream in streams:
            await anext(stream)
        grown = engine.batch_model.cache_bytes()
        for stream in streams:
            await stream.aclose()
        await wait_until(lambda: engine.running == 0 and engine.waiting == 0)
        return grown

    grown = asyncio.run(run())
    idle = engine.batch_model.idle_cache_bytes()
    assert grown > idle
    asyncio.run(wait_until(lambda: engine.batch_model.cache_bytes() == idle))
    ids, finish = generate(engine, PROMPT, max_new_tokens=5, temperature=0.0)
    assert len(ids) == 5 and finish == "length"


def test_more_requests_than_slots_wait_their_turn(tiny_model_dir):
    small = GenerationEngine.load(
        tiny_model_dir, device="cpu", dtype="float32", max_batch_size=2, max_batch_tokens=8
    )
    try:
        alone = [generate(small, p, max_new_tokens=n, temperature=0.0) for p, n in MIXED]

        async def run():
            return await asyncio.gather(*(collect(small, p, greedy(n)) for p, n in MIXED))

        assert asyncio.run(run()) == alone
        assert small.stats.max_running == 2
        # A 63-token prompt went in chunks of at most 8 tokens per step.
        assert max(small.stats.batch_sizes) <= 2
    finally:
        small.close()


def test_chunked_prefill_gives_the_same_tokens(engine, tiny_model_dir):
    long_prompt = [1] + list(range(100, 190)) + [2, 1]
    whole, _ = generate(engine, long_prompt, max_new_tokens=12, temperature=0.0)
    chunked = GenerationEngine.load(
        tiny_model_dir, device="cpu", dtype="float32", max_batch_tokens=16
    )
    try:
        assert generate(chunked, long_prompt, max_new_tokens=12, temperature=0.0)[0] == whole
        assert chunked.stats.prefill_tokens == len(long_prompt)
        assert chunked.stats.steps >= len(long_prompt) // 16 + 12
    finally:
        chunked.close()


def test_the_transformers_fallback_gives_the_same_greedy_tokens(engine, tiny_model_dir):
    fallback = GenerationEngine.load(
        tiny_model_dir, device="cpu", dtype="float32", backend="transformers"
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
    closing = GenerationEngine.load(tiny_model_dir, device="cpu", dtype="float32")

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


def test_top_p_keeps_only_the_head_of_the_distribution():
    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.5)
    picks = {sample_token(logits, params, generator) for _ in range(50)}
    assert picks == {0}
    wide = SamplingParams(max_new_tokens=1, temperature=1.0, top_p=1.0)
    assert {sample_token(logits, wide, generator) for _ in range(200)} == {0, 1}


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
    crashing = GenerationEngine.load(tiny_model_dir, device="cpu", dtype="float32")

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
