"""The native engine's KV memory: prefix caching and the memory budget, on a tiny random Llama."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from contract.errors import EngineBusyError, EngineRequestError
from contract.tokens import SamplingParams
from runners.engine import GIB, GenerationEngine
from runners.metrics import engine_metrics
from tests.runner.test_engine import DEVICE, collect, greedy

SYSTEM = [1] + list(range(100, 147))  # a 48-token "system prompt" shared by every request


def load(model_dir: Path, **options) -> GenerationEngine:
    return GenerationEngine.load(model_dir, device=DEVICE, dtype="float32", **options)


@pytest.fixture(scope="module")
def cached(tiny_model_dir: Path):
    engine = load(tiny_model_dir, max_batch_tokens=16)  # chunked prefill
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def uncached(tiny_model_dir: Path):
    engine = load(tiny_model_dir, max_batch_tokens=16, prefix_caching=False)
    yield engine
    engine.close()


def conversation(seed: int) -> list[list[int]]:
    """Prompts sharing the system prompt, and the later turns of one conversation."""
    rng = random.Random(seed)
    questions = [[rng.randrange(3, 380) for _ in range(rng.randrange(2, 30))] for _ in range(4)]
    turn1 = SYSTEM + questions[0]
    turn2 = turn1 + [2, 1, 77, 78, 79, 2, 1] + questions[1]
    return [turn1, turn2, turn2 + questions[2], SYSTEM + questions[3], SYSTEM[:20] + [5, 6]]


async def staggered(engine: GenerationEngine, prompts: list[list[int]], budget: int):
    tasks = []
    for prompt in prompts:  # each joins a batch already decoding or prefilling
        tasks.append(asyncio.create_task(collect(engine, prompt, greedy(budget))))
        await asyncio.sleep(0.003)
    return await asyncio.gather(*tasks)


def test_greedy_output_is_the_same_with_the_prefix_cache_on_and_off(cached, uncached):
    prompts = conversation(1) + conversation(2)
    expected = asyncio.run(staggered(uncached, prompts, 12))
    hits = cached.blocks.stats.hits
    # Cold, then again with everything cached, then in another order with part of it evicted
    # by other work: the same tokens each time.
    assert asyncio.run(staggered(cached, prompts, 12)) == expected
    assert cached.blocks.stats.hits > hits  # the shared system prompt was reused at once
    assert asyncio.run(staggered(cached, prompts, 12)) == expected
    cached.blocks.clear_cache()
    reordered = prompts[::-1]
    assert asyncio.run(staggered(cached, reordered, 12)) == expected[::-1]
    alone = [asyncio.run(collect(cached, p, greedy(12))) for p in prompts]
    assert alone == expected
    assert uncached.blocks.stats.hits == 0 and uncached.blocks.cached_blocks == 0


def test_a_cached_prefix_is_not_computed_again(cached):
    prompt = SYSTEM + list(range(200, 260))  # 108 tokens
    asyncio.run(collect(cached, prompt, greedy(2)))
    before = cached.stats.prefill_tokens
    asyncio.run(collect(cached, prompt + [9, 9, 9], greedy(2)))  # the next turn, say
    computed = cached.stats.prefill_tokens - before
    assert computed == len(prompt) + 3 - (len(prompt) // 16) * 16
    text = engine_metrics(cached)
    assert "llm_runner_prefix_cache_hits_total" in text
    hits = next(
        float(line.split()[-1]) for line in text.splitlines()
        if line.startswith("llm_runner_prefix_cache_hits_total ")
    )  # fmt: skip
    assert hits == cached.blocks.stats.hits > 0


def test_the_n_choices_of_one_prompt_compute_it_once(cached):
    prompt = [1] + list(range(300, 363))  # 64 tokens: 3 blocks cacheable, the 4th not
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=3)
    cached.blocks.clear_cache()
    before = cached.stats.prefill_tokens

    async def fan_out():
        return await asyncio.gather(*(collect(cached, prompt, params) for _ in range(4)))

    answers = asyncio.run(fan_out())
    assert all(ids == answers[0][0] for ids, _ in answers)  # same seed: same answer
    assert cached.stats.prefill_tokens - before == 64 + 3 * 16


def test_a_flood_on_a_small_budget_is_answered_or_refused_and_memory_stays_put(tiny_model_dir):
    probe = load(tiny_model_dir)
    per_token = probe.batch_model.kv_bytes_per_token()
    probe.close()
    blocks = 40  # 39 usable blocks of 16: 624 positions, about four of these requests
    engine = load(tiny_model_dir, kv_cache_gib=blocks * 16 * per_token / GIB,
                  max_in_flight=12, max_batch_tokens=64)  # fmt: skip
    pool, memory = engine.blocks, engine.batch_model.cache_bytes()
    peak = {"blocks": 0, "rows": 0}
    real = engine.batch_model.forward

    def watched(work):
        held = {b for w in work for b in w.blocks}
        peak["blocks"] = max(peak["blocks"], len(held), pool.used_blocks)
        peak["rows"] = max(peak["rows"], len(work))
        return real(work)

    engine.batch_model.forward = watched
    rng = random.Random(7)

    async def one(i: int):
        prompt = [1] + [rng.randrange(3, 380) for _ in range(rng.randrange(60, 120))]
        try:
            return await collect(engine, prompt, greedy(rng.randrange(80, 130)))
        except EngineBusyError:
            return "refused"

    async def flood():
        return await asyncio.gather(*(one(i) for i in range(30)), return_exceptions=True)

    try:
        outcomes = asyncio.run(flood())
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        assert not failures, failures
        answered = [o for o in outcomes if o != "refused"]
        assert len(answered) >= 12 and len(answered) < 30  # the rest got a 429
        assert all(finish == "length" for _, finish in answered)
        assert peak["blocks"] <= blocks - 1 and peak["rows"] >= 2
        assert engine.batch_model.cache_bytes() == memory == blocks * 16 * per_token
        assert engine.waiting == engine.running == 0 and pool.used_blocks == 0
    finally:
        engine.close()


def test_a_prompt_beyond_the_whole_budget_is_refused_and_a_long_answer_cut_there(
    tiny_model_dir,
):
    probe = load(tiny_model_dir)
    per_token = probe.batch_model.kv_bytes_per_token()
    probe.close()
    engine = load(tiny_model_dir, kv_cache_gib=9 * 16 * per_token / GIB)  # 128 positions
    try:
        with pytest.raises(EngineRequestError, match="KV memory"):
            asyncio.run(collect(engine, [1] * 140, greedy(4)))
        ids, finish = asyncio.run(collect(engine, [1] * 100, greedy(500)))
        assert finish == "length" and 100 + len(ids) <= 128
    finally:
        engine.close()
