"""The vLLM adapter against a stand-in ``AsyncLLM`` (``MagicMock(spec=AsyncLLM)``, so it cannot
drift from vLLM's interface): parameter mapping, logprobs, cancellation, limits, a dead
engine and the stats fed to /metrics. The real engine is served in test_vllm_serve.py."""

from __future__ import annotations

import asyncio
import types
from unittest.mock import MagicMock

import pytest

from contract.errors import EngineBusyError, EngineClosedError, EngineRequestError
from contract.tokens import SamplingParams, StructuredOutput
from runners.metrics import engine_metrics
from runners.settings import RunnerSettings, VLLMSettings
from tests.served import samples

pytest.importorskip("vllm")

from vllm.logprobs import Logprob  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: E402
from vllm.v1.engine.exceptions import EngineDeadError  # noqa: E402
from vllm.v1.metrics.stats import (  # noqa: E402
    PrefixCacheStats,
    SchedulerIterationDetails,
    SchedulerStats,
)

from runners.streaming import StreamOptions  # noqa: E402
from runners.vllm_engine import (  # noqa: E402
    VLLMEngine,
    _StepStats,
    engine_args,
    to_our_logprob,
    to_vllm,
)

CONTEXT = 64


def _output(ids: list[int], finish: str | None = None, logprobs=None) -> types.SimpleNamespace:
    completion = types.SimpleNamespace(token_ids=ids, finish_reason=finish, logprobs=logprobs)
    return types.SimpleNamespace(finished=finish is not None, outputs=[completion])


class FakeVLLM:
    """What ``AsyncLLM.generate`` does for a script of outputs; remembers what it was asked."""

    def __init__(self, outputs: list, *, fail: BaseException | None = None):
        self.outputs, self.fail = outputs, fail
        self.calls: list[tuple] = []
        self.closed_early = 0

    def generate(self, prompt, sampling_params, request_id):
        self.calls.append((prompt, sampling_params, request_id))
        return self._run()

    async def _run(self):
        finished = False
        try:
            for output in self.outputs:
                await asyncio.sleep(0)
                yield output
                finished = output.finished
            if self.fail is not None:
                raise self.fail
        finally:
            if not finished and self.fail is None:
                self.closed_early += 1  # vLLM aborts the request here


# One chunk per vLLM output, as it comes, unless a test says otherwise: most tests here read
# vLLM's outputs through the chunks.
ONE_BY_ONE = StreamOptions(interval=1)


def make_engine(
    fake: FakeVLLM, *, max_in_flight: int | None = None, streaming: StreamOptions = ONE_BY_ONE
) -> VLLMEngine:
    llm = MagicMock(spec=AsyncLLM)
    llm.vllm_config = MagicMock()
    llm.vllm_config.scheduler_config.max_num_seqs = 4
    llm.vllm_config.model_config.max_model_len = CONTEXT
    llm.vllm_config.model_config.get_vocab_size.return_value = 100
    llm.errored = False
    llm.generate.side_effect = fake.generate
    return VLLMEngine(llm, _StepStats(), max_in_flight=max_in_flight, streaming=streaming)


async def collect(engine: VLLMEngine, prompt: list[int], params: SamplingParams):
    return [chunk async for chunk in engine.stream(prompt, params)]


GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[2])


def test_sampling_parameters_keep_their_meaning():
    params = SamplingParams(
        max_new_tokens=500, temperature=0.7, top_p=0.9, seed=3, stop_token_ids=[2, 7],
        presence_penalty=0.5, frequency_penalty=-0.5, logprobs=True, top_logprobs=4,
    )  # fmt: skip
    ours = to_vllm(params, room=100)
    assert ours.max_tokens == 100  # cut at the end of the context window, as natively
    assert (ours.temperature, ours.top_p, ours.seed) == (0.7, 0.9, 3)
    assert ours.stop_token_ids == [2, 7] and ours.ignore_eos  # only the ids the API sends
    assert (ours.presence_penalty, ours.frequency_penalty) == (0.5, -0.5)
    assert ours.logprobs == 4
    assert not ours.detokenize and ours.output_kind == RequestOutputKind.DELTA
    greedy = to_vllm(SamplingParams(max_new_tokens=5, temperature=1e-6), room=100)
    assert greedy.temperature == 0.0 and greedy.logprobs is None and greedy.max_tokens == 5
    assert to_vllm(SamplingParams(max_new_tokens=5, logprobs=True), room=9).logprobs == 0


def test_logprobs_are_the_chosen_tokens_then_the_best_in_order():
    position = {
        5: Logprob(logprob=-3.0, rank=7),  # the sampled token, outside the top 2
        9: Logprob(logprob=-0.1, rank=1),
        4: Logprob(logprob=-1.5, rank=2),
    }
    ours = to_our_logprob(5, position, top=2)
    assert ours.token_id == 5 and ours.logprob == -3.0
    assert ours.top == [(9, -0.1), (4, -1.5)]
    assert to_our_logprob(9, position, top=0).top == []


def test_a_stream_carries_vllms_tokens_and_finish_reason():
    fake = FakeVLLM([_output([10, 11]), _output([12]), _output([2], "stop")])
    engine = make_engine(fake)
    chunks = asyncio.run(collect(engine, [1, 2, 3], GREEDY))
    assert [c.token_ids for c in chunks] == [[10, 11], [12], [2]]
    assert [c.finish_reason for c in chunks] == [None, None, "stop"]
    prompt, sampling, _ = fake.calls[0]
    assert prompt == {"prompt_token_ids": [1, 2, 3]} and sampling.max_tokens == 10
    assert engine.stats.finished == 1 and engine.running + engine.waiting == 0


def test_vllms_outputs_are_handed_on_a_few_tokens_a_chunk():
    """LLM_STREAM_INTERVAL on vLLM: the first token at once, then two a chunk, the last with
    those held before it (runners.streaming)."""
    outputs = [_output([10]), _output([11]), _output([12]), _output([13]), _output([2], "stop")]
    engine = make_engine(FakeVLLM(outputs), streaming=StreamOptions(interval=2, max_delay=60.0))
    chunks = asyncio.run(collect(engine, [1, 2, 3], GREEDY))
    assert [c.token_ids for c in chunks] == [[10], [11, 12], [13, 2]]
    assert chunks[-1].finish_reason == "stop"


def test_logprobs_reach_the_chunks():
    lp = {10: Logprob(logprob=-0.5, rank=1), 11: Logprob(logprob=-1.0, rank=2)}
    fake = FakeVLLM([_output([10], "length", logprobs=[lp])])
    params = SamplingParams(max_new_tokens=1, temperature=0.0, logprobs=True, top_logprobs=2)
    (chunk,) = asyncio.run(collect(make_engine(fake), [1], params))
    assert chunk.logprobs[0].logprob == -0.5 and chunk.logprobs[0].top == [(10, -0.5), (11, -1.0)]


def test_leaving_early_aborts_the_request_and_counts_it_cancelled():
    fake = FakeVLLM([_output([i]) for i in range(100)])
    engine = make_engine(fake)

    async def leave_after_two():
        stream = engine.stream([1], GREEDY)
        await anext(stream)
        await anext(stream)
        assert engine.running + engine.waiting == 1
        await stream.aclose()

    asyncio.run(leave_after_two())
    assert fake.closed_early == 1  # vLLM's generator was closed: it aborts the request
    assert engine.stats.cancelled == 1 and engine.running + engine.waiting == 0


def test_past_max_in_flight_a_request_is_refused_at_once():
    engine = make_engine(FakeVLLM([_output([i]) for i in range(100)]), max_in_flight=1)

    async def three():
        first = engine.stream([1], GREEDY)
        await anext(first)
        with pytest.raises(EngineBusyError):
            await anext(engine.stream([1], GREEDY))
        await first.aclose()
        third = engine.stream([1], GREEDY)  # the slot is free again
        assert (await anext(third)).token_ids == [0]
        await third.aclose()

    asyncio.run(three())
    assert engine.stats.refused == 1 and engine.running + engine.waiting == 0


def test_a_dead_vllm_engine_fails_requests_and_health():
    fake = FakeVLLM([_output([10])], fail=EngineDeadError())
    engine = make_engine(fake)
    with pytest.raises(EngineClosedError):
        asyncio.run(collect(engine, [1], GREEDY))
    assert engine.running + engine.waiting == 0
    engine._engine.errored = True  # what vLLM reports once its engine core died
    assert engine.closed
    with pytest.raises(EngineClosedError):
        asyncio.run(collect(engine, [1], GREEDY))
    assert samples(engine_metrics(engine))[("llm_runner_engine_up", ())] == 0


def test_what_vllm_would_refuse_or_compute_differently_is_refused_first():
    engine = make_engine(FakeVLLM([]))
    with pytest.raises(EngineRequestError) as caught:
        engine.validate([1] * CONTEXT, GREEDY)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(EngineRequestError):
        engine.validate([100], GREEDY)  # outside the vocabulary
    sampled_nucleus = SamplingParams(max_new_tokens=4, temperature=0.8, top_p=0.5, logprobs=True)
    with pytest.raises(EngineRequestError) as caught:
        engine.validate([1], sampled_nucleus)
    assert caught.value.param == "top_p"
    engine.validate(
        [1], SamplingParams(max_new_tokens=4, temperature=0.0, top_p=0.5, logprobs=True)
    )
    engine.validate([1], SamplingParams(max_new_tokens=4, temperature=0.8, top_p=0.5))


def test_vllms_step_stats_feed_the_runner_series():
    step = _StepStats()
    engine = make_engine(FakeVLLM([]))
    engine._step_stats = step
    engine.stats = step.stats
    for ctx_tokens, decodes in ((30, 0), (0, 2), (0, 2)):
        stats = SchedulerStats(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25)
        stats.prefix_cache_stats = PrefixCacheStats(queries=ctx_tokens, hits=ctx_tokens // 2)
        stats.iteration_details = SchedulerIterationDetails(
            iteration_index=0, num_ctx_requests=int(ctx_tokens > 0), num_ctx_tokens=ctx_tokens,
            num_generation_requests=decodes, num_generation_tokens=decodes, elapsed_ms=20.0,
        )  # fmt: skip
        step.record(stats)
    assert (step.stats.steps, step.stats.prefill_tokens, step.stats.decode_tokens) == (3, 30, 4)
    assert step.stats.busy_seconds == pytest.approx(0.06)
    exported = samples(engine_metrics(engine))
    assert exported[("llm_runner_kv_cache_usage_ratio", ())] == 0.25
    assert exported[("llm_runner_prefix_cache_queries_total", ())] == 30
    assert exported[("llm_runner_prefix_cache_hits_total", ())] == 15
    assert exported[("llm_runner_prefix_cache_hit_rate", ())] == 0.5
    assert exported[("llm_runner_engine_info", (("engine", "vllm"),))] == 1


def test_engine_arguments_follow_the_settings():
    settings = RunnerSettings(max_batch_size=8)
    vllm = VLLMSettings(
        vllm_max_model_len=2048, vllm_tensor_parallel_size=2,
        vllm_enforce_eager=True, vllm_prefix_caching=False, vllm_gpu_memory_utilization=0.8,
    )  # fmt: skip
    on_cpu = engine_args("/models/x", settings, vllm, on_gpu=False)
    assert (on_cpu.model, on_cpu.tokenizer, on_cpu.dtype) == ("/models/x", "/models/x", "float32")
    assert on_cpu.kv_cache_memory_bytes == 2 << 30  # our CPU default: a budget, not 90 %
    assert (on_cpu.max_num_seqs, on_cpu.max_model_len, on_cpu.tensor_parallel_size) == (8, 2048, 2)
    assert on_cpu.enforce_eager and not on_cpu.enable_prefix_caching
    assert on_cpu.gpu_memory_utilization == 0.8 and on_cpu.logprobs_mode == "processed_logprobs"
    assert on_cpu.shutdown_timeout == 90  # SIGTERM drains rather than aborts
    # Compact JSON as on the native engine: vLLM reads it from the engine's config only.
    structured = on_cpu.structured_outputs_config
    assert (structured.backend, structured.disable_any_whitespace) == ("xgrammar", True)
    on_gpu = engine_args("/models/x", RunnerSettings(), VLLMSettings(), on_gpu=True)
    assert on_gpu.dtype == "bfloat16" and on_gpu.kv_cache_memory_bytes is None
    assert on_gpu.enable_prefix_caching  # on by default
    sized = engine_args(
        "/models/x", RunnerSettings(), VLLMSettings(vllm_kv_cache_gib=0.5), on_gpu=True
    )
    assert sized.kv_cache_memory_bytes == 1 << 29


def test_a_tool_call_structural_tag_goes_to_vllm_as_it_is():
    tag = '{"type":"structural_tag","format":{"type":"const_string","value":"x"}}'
    spec = StructuredOutput(kind="structural_tag", structural_tag=tag)
    ours = to_vllm(SamplingParams(max_new_tokens=5, structured=spec), room=100)
    assert ours.structured_outputs.structural_tag == tag
    assert ours.structured_outputs.json is None
