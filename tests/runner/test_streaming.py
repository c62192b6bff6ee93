"""How a stream's tokens are handed on: a few at a time, the first and the last at once, none
held past its delay (runners/streaming.py), and the engine's streams built that way."""

from __future__ import annotations

import asyncio
import math

from contract.tokens import GenerationChunk, SamplingParams, TokenLogprob
from runners.engine import GenerationEngine
from runners.streaming import StreamBuffer, StreamOptions, merge


def chunk(token: int, finish=None, cached=None) -> GenerationChunk:
    return GenerationChunk(
        token_ids=[token], finish_reason=finish, cached_tokens=cached,
        logprobs=[TokenLogprob(token_id=token, logprob=-0.1 * token)],
    )  # fmt: skip


def test_the_first_token_goes_at_once_then_tokens_go_interval_at_a_time():
    buffer = StreamBuffer(StreamOptions(interval=3, max_delay=10.0))
    sent = [buffer.add(chunk(t), now=t * 0.01) for t in range(1, 8)]
    assert [[c.token_ids[0] for c in due] for due in sent] == [
        [1], [], [], [2, 3, 4], [], [], [5, 6, 7]
    ]  # fmt: skip


def test_the_last_token_goes_at_once_with_those_held_before_it():
    buffer = StreamBuffer(StreamOptions(interval=4, max_delay=10.0))
    buffer.add(chunk(1), now=0.0)
    assert buffer.add(chunk(2), now=0.01) == []
    due = buffer.add(chunk(3, finish="stop"), now=0.02)
    assert [c.token_ids[0] for c in due] == [2, 3] and due[-1].finish_reason == "stop"


def test_tokens_are_held_only_while_the_next_step_would_still_come_within_the_delay():
    buffer = StreamBuffer(StreamOptions(interval=8, max_delay=0.05))
    buffer.add(chunk(1), now=0.0)
    assert buffer.add(chunk(2), now=0.01) == []  # held from 0.01, the next due about 0.02
    assert buffer.add(chunk(3), now=0.02) == []
    assert buffer.add(chunk(4), now=0.03) == []
    assert buffer.add(chunk(5), now=0.04) == []  # the next at 0.05 finds 2 held 40 ms
    # at 0.05 the next (0.06) would find 2 held 50 ms: all go now
    assert [c.token_ids[0] for c in buffer.add(chunk(6), now=0.05)] == [2, 3, 4, 5, 6]


def test_at_steps_longer_than_the_delay_every_token_goes_as_it_comes():
    buffer = StreamBuffer(StreamOptions(interval=2, max_delay=0.05))
    sent = [buffer.add(chunk(t), now=t * 0.06) for t in range(1, 6)]
    assert [[c.token_ids[0] for c in due] for due in sent] == [[1], [2], [3], [4], [5]]


def test_a_slow_step_after_fast_ones_sends_what_is_held():
    buffer = StreamBuffer(StreamOptions(interval=4, max_delay=0.05))
    buffer.add(chunk(1), now=0.0)
    assert buffer.add(chunk(2), now=0.01) == []
    assert [c.token_ids[0] for c in buffer.add(chunk(3), now=0.08)] == [2, 3]


def test_options_default_to_the_settings_defaults():
    from runners.settings import RunnerSettings

    assert StreamOptions() == RunnerSettings.model_construct().streaming()


def test_one_token_per_chunk_hands_every_token_on_as_it_comes():
    buffer = StreamBuffer(StreamOptions(interval=1, max_delay=10.0))
    assert all(len(buffer.add(chunk(t), now=0.0)) == 1 for t in range(5))


def test_merged_chunks_keep_every_token_its_logprob_the_first_cached_and_the_last_finish():
    merged = merge([chunk(1, cached=7), chunk(2), chunk(3, finish="length")])
    assert merged.token_ids == [1, 2, 3]
    assert [e.token_id for e in merged.logprobs] == [1, 2, 3]
    assert merged.cached_tokens == 7 and merged.finish_reason == "length"


def _chunks(engine: GenerationEngine, prompt: list[int], n: int) -> list[GenerationChunk]:
    async def run():
        params = SamplingParams(max_new_tokens=n, temperature=0.0)
        return [c async for c in engine.stream(prompt, params)]

    return asyncio.run(run())


def test_the_engine_streams_a_few_tokens_a_chunk_and_the_same_tokens(tiny_model_dir):
    by_interval = {}
    for interval in (1, 3):
        engine = GenerationEngine.load(
            tiny_model_dir, dtype="float32",
            streaming=StreamOptions(interval=interval, max_delay=60.0),
        )  # fmt: skip
        try:
            by_interval[interval] = _chunks(engine, [1, 5, 9, 12], 10)
        finally:
            engine.close()
    one, three = by_interval[1], by_interval[3]
    tokens = [t for c in one for t in c.token_ids]
    assert [t for c in three for t in c.token_ids] == tokens and len(tokens) == 10
    assert len(three[0].token_ids) == 1  # time to first token is not traded
    assert len(three) <= 1 + math.ceil(9 / 3)  # never more chunks than the interval allows
    assert three[-1].finish_reason == "length"
