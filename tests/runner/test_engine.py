"""The runner's engine on a tiny random Llama: exact, reproducible, bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from logic.protocol import SamplingParams
from runners.engine import GenerationEngine, sample_token

PROMPT = [1, 40, 41, 42, 43, 44, 45, 2, 1, 50]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> GenerationEngine:
    return GenerationEngine.load(tiny_model_dir, device="cpu", dtype="float32")


def generate(engine: GenerationEngine, prompt: list[int], **params) -> tuple[list[int], str]:
    async def run():
        ids, finish = [], None
        async for chunk in engine.stream(prompt, SamplingParams(**params)):
            ids += chunk.token_ids
            finish = chunk.finish_reason
        return ids, finish

    return asyncio.run(run())


def test_greedy_matches_transformers_generate(engine):
    ids, finish = generate(engine, PROMPT, max_new_tokens=20, temperature=0.0)
    reference = engine.model.generate(
        torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False, eos_token_id=None
    )[0, len(PROMPT) :].tolist()
    assert ids == reference
    assert finish == "length" and len(ids) == 20


def test_seeded_sampling_is_reproducible(engine):
    params = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    first, _ = generate(engine, PROMPT, **params)
    again, _ = generate(engine, PROMPT, **params)
    other, _ = generate(engine, PROMPT, **{**params, "seed": 4321})
    assert first == again
    assert first != other


def test_seeded_request_is_reproducible_while_other_requests_interleave(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)

    async def collect(prompt, p):
        return [c.token_ids[0] async for c in engine.stream(prompt, p)]

    async def run():
        alone = await collect(PROMPT, params)
        noise = SamplingParams(max_new_tokens=16, temperature=1.0)
        together = await asyncio.gather(
            collect(PROMPT, params), collect(PROMPT[:4], noise), collect(PROMPT[2:], noise)
        )
        return alone, together[0]

    alone, mixed = asyncio.run(run())
    assert alone == mixed


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


def test_closing_the_stream_stops_generation(engine):
    async def run():
        stream = engine.stream(PROMPT, SamplingParams(max_new_tokens=100, temperature=0.0))
        got = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return got

    assert len(asyncio.run(run())) == 2
    assert not engine._lock.locked()


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
