"""The generation engine: continuous (iteration-level) batching over one model.

It imports no torch itself: the model (:mod:`runners.batch_model`, or llama.cpp) and the
sampler (:mod:`runners.sampling` for torch tensors, :mod:`runners.host_sampling` for numpy
arrays) bring their own, so a llama.cpp runner never loads torch.
The engine speaks token ids only: prompt ids and :class:`SamplingParams` in, a stream of
:class:`GenerationChunk` s out.

One scheduler thread owns the model. Each iteration it builds one step from

* every running sequence's next decode token (one row each), then
* prompt tokens of waiting sequences (chunked prefill), FIFO, while the step's token
  budget (``max_batch_tokens``) and the free slots (``max_batch_size``) allow,

runs one forward pass (:meth:`BatchModel.forward`), samples a token for every sequence
whose step produced logits, and hands each token to its consumer's event loop at once. A
request therefore joins the batch right after its prefill, leaves it at the step it
finishes, and its first token costs one prefill, not a whole batch. A consumer that goes
away (closed stream, client disconnect, timeout) marks its request cancelled; the
scheduler drops it before the next step and its slot is free for the next request.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.engine import GREEDY_BELOW, EngineStats, Series, check_prompt
from contract.errors import EngineBusyError, EngineClosedError, EngineRequestError
from contract.tokens import FinishReason, GenerationChunk, SamplingParams, TokenLogprob
from runners.kv_blocks import Allocation, BlockPool, chain_hashes, common_prefix
from runners.settings import (
    DEFAULT_CPU_KV_GIB,
    DEVICE_LIMITS,
    ClosingOptions,
    NativeEngineSettings,
    RunnerSettings,
)
from runners.streaming import StreamBuffer, StreamOptions, merge
from runners.work import BatchModel, RowParams, Sampler, Work

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

GIB = 1 << 30
# A new prompt waits for a prompt in flight to compute what they share, rather than compute
# it beside it, when that is at least this much (on models that keep prefixes themselves):
# waiting costs it a step, so a short shared head (a chat template's default system prompt)
# is computed again instead.
_WAIT_FOR_SHARED_TOKENS = 64
# Our engine's defaults: the settings class states them once (what load() is not given).
_DEFAULTS = NativeEngineSettings.model_construct()
_CLOSING = RunnerSettings.model_construct().closing()
_STREAMING = RunnerSettings.model_construct().streaming()


def kv_budget_bytes(
    device: torch.device, gib: float | None, fraction: float | None, most: int | None = None
) -> int:
    """The KV memory budget: ``gib`` when set. Else on CUDA a ``fraction`` of the free memory
    (measure it after the weights are loaded), on a CPU ``DEFAULT_CPU_KV_GIB``; either at
    most ``most`` bytes (what the engine can use: see :func:`kv_bytes_useful`)."""
    if gib:
        return int(gib * GIB)
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * (fraction or _DEFAULTS.kv_cache_fraction))
    else:
        budget = int(DEFAULT_CPU_KV_GIB * GIB)
    return min(budget, most) if most else budget


def kv_bytes_useful(per_token: int, batch: int, context: int) -> int:
    """Twice a full batch of full-context sequences: all the running sequences can hold,
    and as much again for cached prefixes. A default budget larger than that would be
    memory the engine never uses well (a small model's 2 GiB on a CPU, 100 GB on a GPU)."""
    return 2 * batch * context * per_token


def resolve_device(setting: str = "auto") -> torch.device:
    """``auto`` is cuda when a GPU is visible, else cpu."""
    import torch

    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on cuda (half the memory traffic per decode step), float32 on cpu."""
    import torch

    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]


def _put_all(items: list[tuple[_Request, GenerationChunk]]) -> None:
    for request, item in items:
        request.queue.put_nowait(item)


@dataclass(eq=False)
class _Request:
    """One request's state; the scheduler thread owns everything but ``cancelled``."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: Any  # the sampler's random generator; None: greedy
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    stop_ids: frozenset[int] = frozenset()
    max_length: int = 0  # prompt + answer at most, in tokens: what its KV is sized for
    slot: int = -1
    length: int = 0  # tokens in the KV cache
    alloc: Allocation | None = None  # its KV blocks, once admitted
    token_ids: list[int] = field(default_factory=list)  # prompt, then the tokens fed back
    block_hashes: list[bytes] | None = None  # the prompt's full blocks, for the prefix cache
    matcher: Any = None  # structured outputs: its grammar state (runners.grammar.Constraint)
    guard: Any = None  # and its closing guard (runners.closing.Guard), when one is on
    next_token: int | None = None  # sampled, not yet fed
    produced: int = 0
    # Presence and frequency penalties, kept as the bias they add to the logits ([vocab],
    # allocated at the first generated token); None for a request without penalties.
    penalty: Any = None
    seen: set[int] = field(default_factory=set)  # generated token ids, for the presence term
    cancelled: bool = False  # set by the consumer, from its event loop's thread
    finished: bool = False
    buffer: StreamBuffer | None = None  # its tokens until they are due (runners.streaming)

    @property
    def prefilling(self) -> bool:
        return self.length < len(self.prompt_ids)

    @property
    def penalized(self) -> bool:
        return bool(self.params.presence_penalty or self.params.frequency_penalty)

    def penalize(self, token: int, vocab_size: int, sampler: Sampler) -> None:
        """Add a generated ``token`` to the penalty bias: ``-(presence * [count > 0] +
        frequency * count)`` for each token, updated by one element per step."""
        params = self.params
        delta = params.frequency_penalty
        if token not in self.seen:
            self.seen.add(token)
            delta += params.presence_penalty
        if delta:
            if self.penalty is None:
                self.penalty = sampler.zeros(vocab_size)
            self.penalty[token] -= delta

    def deliver(self, item: GenerationChunk | BaseException) -> None:
        """Hand ``item`` to the consumer's loop; a consumer whose loop is gone is cancelled."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # event loop closed
            self.cancelled = True


class GenerationEngine:
    """Streams generated tokens for many concurrent requests from one continuously batched model.

    ``stream`` may be called from any event loop (and from several). The model runs only on
    the scheduler thread, so forward passes never overlap. It is the ``native`` engine of
    :class:`contract.engine.Engine`.
    """

    name = "native"

    def __init__(
        self,
        build: Callable[[], BatchModel],
        device: Any = None,
        *,
        sampler: Sampler | None = None,
        max_batch_size: int,
        max_batch_tokens: int,
        max_in_flight: int | None = None,
        prefix_caching: bool = True,
        tokenizer_dir: str | Path | None = None,
        closing: ClosingOptions = _CLOSING,
        streaming: StreamOptions = _STREAMING,
        name: str = "native",
    ):
        """Start the scheduler thread; it calls ``build`` and warms the model up before this
        returns (and re-raises what ``build`` raised).

        The model is built and run on the scheduler thread only. With libgomp (torch's CPU
        OpenMP), every thread that runs a parallel op keeps its own worker team; once there are
        more OpenMP threads than cores, libgomp stops spin-waiting between parallel regions,
        which measured 40% slower per decode step here (85 ms against 60 ms at batch 8).
        """
        self.name = name  # "native", or "llamacpp" over runners.llamacpp_model
        if sampler is None:  # torch logits on ``device`` (our native models)
            import torch

            from runners.sampling import TorchSampler

            device = device or torch.device("cpu")
            sampler = TorchSampler(device)
        self.device = device
        self.sampler = sampler
        self.stats = EngineStats()
        self._max_in_flight = max_in_flight
        self._prefix_caching = prefix_caching
        self._tokenizer_dir = tokenizer_dir  # for structured outputs' grammars
        self._closing = closing
        self._streaming = streaming
        self._grammars: Any = None
        self._pending: collections.deque[_Request] = collections.deque()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._wake = threading.Condition()
        self._closed = False
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main, args=(build, max_batch_size, max_batch_tokens),
            name="llm-engine", daemon=True,
        )  # fmt: skip
        self._thread.start()
        # Stop the thread before the interpreter tears down: a daemon thread still inside
        # torch at exit aborts the process ("terminate called without an active exception").
        atexit.register(self.close)
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def _main(self, build: Callable[[], BatchModel], max_batch_size: int, tokens: int) -> None:
        try:
            with self.sampler.session():
                self.batch_model = build()
                self._warm_up()
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor's caller
            self._load_error = exc
            self._ready.set()
            return
        self.context_length = self.batch_model.context_length
        self.vocab_size = self.batch_model.vocab_size
        self.max_batch_size = min(max_batch_size, self.batch_model.max_slots)
        self.max_batch_tokens = max(tokens, self.max_batch_size)
        # Bounded: a full batch running and one more waiting for slots, unless set otherwise.
        self.max_in_flight = self._max_in_flight or 2 * self.max_batch_size
        self._free_slots = list(range(self.max_batch_size))
        model = self.batch_model
        self.blocks = BlockPool(
            model.num_blocks, model.block_size,
            prefix_caching=self._prefix_caching and model.paged,
        )  # fmt: skip
        self._ready.set()
        self._run()

    def _warm_up(self) -> None:
        """A prefill and a decode step, so no request pays for lazy initialization. (They
        write block 1, which is free: a block's stale contents are never read unmasked.)"""
        self.batch_model.forward([Work(0, [0, 1, 2], 0, blocks=(1,))])
        self.batch_model.forward([Work(0, [3], 3, blocks=(1,))])
        self.batch_model.release(0)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        backend: str = _DEFAULTS.native_backend,
        max_batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        max_in_flight: int | None = None,
        packed_weights: bool = _DEFAULTS.cpu_packed_weights,
        kv_cache_gib: float | None = _DEFAULTS.kv_cache_gib,
        kv_cache_fraction: float | None = _DEFAULTS.kv_cache_fraction,
        kv_block_size: int = _DEFAULTS.kv_block_size,
        prefix_caching: bool = _DEFAULTS.prefix_caching,
        simulated_answer_tokens: int = _DEFAULTS.simulated_answer_tokens,
        closing: ClosingOptions = _CLOSING,
        streaming: StreamOptions = _STREAMING,
    ) -> GenerationEngine:
        """Our engine on a model directory; each option is the setting of the same name
        (:class:`runners.settings.NativeEngineSettings`, ``RunnerSettings``), defaults
        included."""
        import torch
        from transformers import AutoModelForCausalLM

        from runners.batch_model import build_batch_model, kv_bytes_per_token

        if threads:
            torch.set_num_threads(threads)
        if device == "simulated":  # a GPU's timing, without a GPU (runners.simulated)
            return cls._load_simulated(
                path,
                max_batch_size=max_batch_size,
                max_batch_tokens=max_batch_tokens,
                max_in_flight=max_in_flight,
                kv_cache_gib=kv_cache_gib,
                kv_block_size=kv_block_size,
                prefix_caching=prefix_caching,
                answer_tokens=simulated_answer_tokens,
                streaming=streaming,
            )
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        default_batch, default_tokens = DEVICE_LIMITS.get(dev.type, DEVICE_LIMITS["cpu"])
        batch = max_batch_size or default_batch

        def build() -> BatchModel:
            # Straight onto the device: an 8B model does not pass through host memory.
            placed = {"device_map": dev} if dev.type != "cpu" else {}
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, **placed)
            model.to(dev).eval()
            context = int(getattr(model.config, "max_position_embeddings", 2048))
            per_token = kv_bytes_per_token(model.config, model.dtype)
            useful = kv_bytes_useful(per_token, batch, context)
            return build_batch_model(
                model,
                backend=backend,
                max_slots=batch,
                context_length=context,
                kv_budget_bytes=kv_budget_bytes(dev, kv_cache_gib, kv_cache_fraction, useful),
                block_size=kv_block_size,
                packed_weights=packed_weights,
            )

        engine = cls(
            build,
            dev,
            max_batch_size=batch,
            max_batch_tokens=max_batch_tokens or default_tokens,
            max_in_flight=max_in_flight,
            prefix_caching=prefix_caching,
            tokenizer_dir=path,
            closing=closing,
            streaming=streaming,
        )
        pool = engine.blocks
        logger.info(
            "Loaded %s on %s as %s: %s, batch <= %d sequences / %d tokens per step, KV %d "
            "blocks of %d tokens (%.2f GiB), prefix caching %s",
            path, dev, torch_dtype, type(engine.batch_model).__name__,
            engine.max_batch_size, engine.max_batch_tokens, pool.num_blocks, pool.block_size,
            pool.num_blocks * pool.block_size * engine.batch_model.kv_bytes_per_token() / GIB,
            "on" if pool.prefix_caching else "off",
        )  # fmt: skip
        return engine

    @classmethod
    def _load_simulated(
        cls,
        path: str | Path,
        *,
        max_batch_size: int | None,
        max_batch_tokens: int | None,
        max_in_flight: int | None,
        kv_cache_gib: float | None,
        kv_block_size: int,
        prefix_caching: bool,
        answer_tokens: int,
        streaming: StreamOptions = _STREAMING,
    ) -> GenerationEngine:
        """The engine on the SIMULATED accelerator, with a GPU's default limits."""
        import torch

        from runners.simulated import build_simulated

        batch, tokens = DEVICE_LIMITS["cuda"]
        batch = max_batch_size or batch

        def build() -> BatchModel:
            return build_simulated(
                path,
                max_slots=batch,
                kv_budget_bytes=int(kv_cache_gib * GIB) if kv_cache_gib else None,
                block_size=kv_block_size,
                answer_tokens=answer_tokens,
            )

        return cls(
            build,
            torch.device("cpu"),  # where the logits are built and sampled
            max_batch_size=batch,
            max_batch_tokens=max_batch_tokens or tokens,
            max_in_flight=max_in_flight,
            prefix_caching=prefix_caching,
            tokenizer_dir=path,
            streaming=streaming,
        )

    @property
    def model(self) -> Any:
        """The underlying transformers model."""
        return self.batch_model.model  # type: ignore[attr-defined]

    # -- the consumer side (any event loop) ------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_prompt(prompt_ids, context_length=self.context_length, vocab_size=self.vocab_size)
        if params.structured is not None and getattr(self.batch_model, "simulated", False):
            # Its placeholder answer cannot follow a grammar: refused, not answered with junk.
            raise EngineRequestError(
                "Structured outputs and tool calls are not simulated (LLM_DEVICE=simulated).",
                code="unsupported_parameter",
                param=params.structured.param,
            )
        capacity = self.blocks.capacity_tokens
        if len(prompt_ids) + 1 > capacity:
            raise EngineRequestError(
                f"The prompt has {len(prompt_ids)} tokens; this runner's KV memory holds "
                f"{capacity} in all.",
                code="context_length_exceeded",
            )

    def _make_request(self, prompt_ids: list[int], params: SamplingParams) -> _Request:
        generator = None
        if params.temperature >= GREEDY_BELOW:
            generator = self.sampler.generator(params.seed)
        return _Request(
            prompt_ids=list(prompt_ids),
            params=params,
            generator=generator,
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            stop_ids=frozenset(params.stop_token_ids),
            # Past the KV memory the whole pool holds, an answer ends as at the context window.
            max_length=min(
                len(prompt_ids) + params.max_new_tokens,
                self.context_length,
                self.blocks.capacity_tokens,
            ),
            token_ids=list(prompt_ids),
            buffer=StreamBuffer(self._streaming) if self._streaming.interval > 1 else None,
        )

    async def stream(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        """Generated tokens as they come; the last chunk carries the finish reason.

        When the consumer falls behind, the tokens waiting for it are sent as one chunk.
        """
        self.validate(prompt_ids, params)
        request = self._make_request(prompt_ids, params)
        if params.structured is not None:
            grammars = self._get_grammars()
            request.matcher = await grammars.matcher(params.structured, params.stop_token_ids)
            if self._closing.active:
                request.guard = grammars.guard_on(
                    request.matcher,
                    budget=request.max_length - len(prompt_ids),
                    options=self._closing,
                )
        self._submit(request)
        first = True
        try:
            while True:
                chunks: list[GenerationChunk] = []
                item = await request.queue.get()
                while True:
                    if isinstance(item, BaseException):
                        raise item
                    chunks.append(item)
                    if item.finish_reason is not None or request.queue.empty():
                        break
                    item = request.queue.get_nowait()
                chunk = merge(chunks)
                if first:
                    # The first chunk says how much of the prompt the prefix cache held (the
                    # request was admitted, its blocks looked up, before any token came).
                    chunk.cached_tokens = request.alloc.cached_tokens if request.alloc else None
                    first = False
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            if not request.finished:
                request.cancelled = True
                self._notify()

    def _get_grammars(self) -> Any:
        if self._grammars is None:
            if self._tokenizer_dir is None:
                raise EngineRequestError(
                    "Structured outputs need the model's tokenizer, which this engine was not "
                    "given.",
                    param="response_format",
                )
            from runners.grammar import Grammars  # xgrammar only once a request needs it

            self._grammars = Grammars(self._tokenizer_dir, self.vocab_size)
        return self._grammars

    def _submit(self, request: _Request) -> None:
        with self._wake:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            if self.running + self.waiting >= self.max_in_flight:
                self.stats.refused += 1
                raise EngineBusyError(f"the engine holds {self.max_in_flight} requests already")
            self._pending.append(request)
            self._wake.notify()

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler; requests still in it fail with :class:`EngineClosedError`."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)
        if self._grammars is not None:
            self._grammars.close()

    @property
    def closed(self) -> bool:
        """True once the engine is shut down or its scheduler died: it takes no more requests."""
        return self._closed

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._pending)

    def extra_metrics(self) -> list[Series]:
        pool, prefix = self.blocks, self.blocks.stats
        total = pool.num_blocks - 1
        hit_rate = prefix.hits / prefix.queries if prefix.queries else 0.0
        simulated = []
        if getattr(self.batch_model, "simulated", False):
            simulated = [
                Series("simulated_device", "gauge", "1: the accelerator is a SIMULATION "
                       "(LLM_DEVICE=simulated); no model computes the answers.", 1),
                Series("device_busy_seconds_total", "counter",
                       "The simulated accelerator's busy time (its latency model).",
                       round(self.batch_model.device_seconds, 6)),
            ]  # fmt: skip
        own = getattr(self.batch_model, "extra_metrics", None)  # the model's own (llama.cpp)
        return simulated + (own() if own else []) + [
            Series("kv_cache_usage_ratio", "gauge", "Fraction of the KV cache in use.",
                   round(pool.used_blocks / total, 6)),
            Series("kv_cache_blocks", "gauge", "KV blocks in the memory budget.", total),
            Series("kv_cache_block_tokens", "gauge", "Token positions per KV block.",
                   pool.block_size),
            Series("prefix_cache_blocks", "gauge", "KV blocks held in the prefix cache.",
                   pool.cached_blocks),
            Series("prefix_cache_queries_total", "counter",
                   "Prompt tokens looked up in the prefix cache.", prefix.queries),
            Series("prefix_cache_hits_total", "counter",
                   "Prompt tokens found in the prefix cache (their KV reused).", prefix.hits),
            Series("prefix_cache_misses_total", "counter",
                   "Prompt tokens looked up and not found (computed).",
                   prefix.queries - prefix.hits),
            Series("prefix_cache_hit_rate", "gauge",
                   "Hits over queries since the start.", round(hit_rate, 6)),
        ]  # fmt: skip

    # -- the scheduler thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            with self.sampler.session():
                while self._iterate():
                    pass
        except BaseException:  # noqa: BLE001 - a scheduler bug must not leave streams hanging
            logger.exception("the engine's scheduler stopped")
        finally:
            with self._wake:
                self._closed = True
                leftovers = [*self._running, *self._waiting, *self._pending]
                self._pending.clear()
            self._outbox.clear()
            for request in leftovers:
                self._finish(request, cancelled=False)
                request.deliver(EngineClosedError("the engine is shut down"))

    def _iterate(self) -> bool:
        """One scheduling round; False once the engine is closed."""
        with self._wake:
            while not self._closed and not self._has_work():
                self._wake.wait()
            if self._closed:
                return False
            self._waiting.extend(self._pending)
            self._pending.clear()
        self._drop_cancelled()
        work, members = self._schedule()
        if not work:
            return True
        started = time.perf_counter()
        try:
            logits = self.batch_model.forward(work)
        except Exception as exc:  # a failed step fails requests, not the engine
            self._step_failed(members, work, exc)
            return True
        self._advance(members, work, logits)  # reads the sampled tokens: the device is done
        self.stats.busy_seconds += time.perf_counter() - started
        return True

    def _step_failed(self, members: list[_Request], work: list[Work], exc: Exception) -> None:
        """Fail the requests a failed step can be blamed on.

        A step that admitted prompt tokens most likely failed on them (a long prompt that
        needs more cache than there is memory for), so only those requests fail and the
        decodes run again next step: rewriting the same positions is harmless, and nothing
        advanced. A decode-only step that fails fails all its requests.
        """
        prefills = [r for r, w in zip(members, work, strict=True) if len(w.token_ids) > 1]
        blamed = prefills or members
        logger.error(
            "generation step failed (%r); failing %d of %d requests", exc, len(blamed), len(members)
        )
        self._outbox.clear()
        for request in blamed:
            self._finish(request, cancelled=False)
            request.deliver(RuntimeError(f"generation step failed: {type(exc).__name__}"))

    def _has_work(self) -> bool:
        return bool(self._pending or self._waiting or self._running)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._running if r.cancelled]:
            self._finish(request, cancelled=True)
        if any(r.cancelled for r in self._waiting):
            for request in [r for r in self._waiting if r.cancelled]:
                self._finish(request, cancelled=True)

    def _schedule(self) -> tuple[list[Work], list[_Request]]:
        """This step's work: every decode, then prefill chunks within the token budget.

        A new request joins when a slot is free and the KV pool can promise every block it
        may grow to; its prompt's blocks found in the prefix cache are not computed again.
        """
        work: list[Work] = []
        members: list[_Request] = []
        budget = self.max_batch_tokens
        pool = self.blocks
        for request in self._running:
            if not request.prefilling:
                pool.grow(request.alloc, request.length + 1)
                work.append(Work(request.slot, [request.next_token], request.length,
                                 blocks=tuple(request.alloc.blocks)))  # fmt: skip
                members.append(request)
                budget -= 1
        # Blocks being computed by prompts in flight: a prompt that shares them waits a step
        # and finds them cached (the ``n`` choices of one prompt compute it once).
        computing = {
            digest
            for r in self._running
            if r.prefilling and r.block_hashes
            for digest in r.block_hashes[len(r.alloc.hashes) :]
        }
        # Half-done prefills first (they hold slots), then new requests in arrival order.
        prefills = [r for r in self._running if r.prefilling] + list(self._waiting)
        for request in prefills:
            if budget <= 0:
                break
            if request.slot < 0 and not (self._free_slots and self._admit(request, computing)):
                break
            start = request.length
            chunk = request.prompt_ids[start : start + budget]
            done = start + len(chunk) == len(request.prompt_ids)
            pool.grow(request.alloc, start + len(chunk))
            work.append(Work(request.slot, chunk, start, want_logits=done,
                             blocks=tuple(request.alloc.blocks)))  # fmt: skip
            members.append(request)
            budget -= len(chunk)
            if request.block_hashes:
                computing.update(request.block_hashes[len(request.alloc.hashes) :])
        return work, members

    def _admit(self, request: _Request, computing: set[bytes]) -> bool:
        """Give ``request`` a slot and its KV reservation; False (it waits) when the pool
        cannot promise its blocks yet, or a prompt in flight is computing its next block."""
        pool = self.blocks
        if request.block_hashes is None:
            request.block_hashes = (
                chain_hashes(request.prompt_ids, pool.block_size) if pool.prefix_caching else []
            )
        hashes = request.block_hashes
        if computing:  # (the lookup is admit's own otherwise)
            found = len(pool.lookup(hashes))
            if found < len(hashes) and hashes[found] in computing:
                return False
        model = self.batch_model
        keeps_prefixes = hasattr(model, "reuse")  # a model that keeps them itself (llama.cpp)
        if keeps_prefixes and self._prefix_caching and self._shares_a_prefill(request):
            return False
        alloc = pool.admit(request.prompt_ids, request.max_length, hashes)
        if alloc is None:
            return False
        request.alloc = alloc
        if keeps_prefixes:
            slot = model.choose_slot(self._free_slots, request.prompt_ids)
            self._free_slots.remove(slot)
            if self._prefix_caching:
                alloc.cached_tokens = model.reuse(slot, request.prompt_ids)
            pool.stats.queries += len(request.prompt_ids)
            pool.stats.hits += alloc.cached_tokens
        else:
            slot = self._free_slots.pop(0)
        request.length = alloc.cached_tokens
        request.slot = slot
        self._waiting.remove(request)
        self._running.append(request)
        return True

    def _shares_a_prefill(self, request: _Request) -> bool:
        """Whether a prompt still being computed shares ``_WAIT_FOR_SHARED_TOKENS`` or more of
        ``request``'s prompt beyond what it has computed yet. On a model that keeps prefixes
        itself (llama.cpp's cells), ``request`` then waits and reuses those cells once they
        are there, instead of computing them again beside it: the ``n`` choices of one
        prompt, or clients that share a system prompt and arrive together. (Our paged model
        gets the same from the block hashes of prompts in flight, above.)"""
        for other in self._running:
            if other.prefilling:
                common = common_prefix(other.prompt_ids, request.prompt_ids)
                if common - other.length >= _WAIT_FOR_SHARED_TOKENS:
                    return True
        return False

    def _advance(self, members: list[_Request], work: list[Work], logits: Any) -> None:
        """Account for the step, then choose and emit a token for each row of ``logits``:
        penalties, sampling and log-probabilities for all rows at once on the device, and one
        read-back (the engine's :class:`runners.work.Sampler`).

        ``logits`` is this step's own tensor or array: penalties and masks change it in place.
        """
        stats = self.stats
        stats.steps += 1
        stats.batch_sizes[len(members)] += 1
        stats.max_running = max(stats.max_running, len(self._running))
        rows: list[_Request] = []
        for request, item in zip(members, work, strict=True):
            request.length += len(item.token_ids)
            if request.length <= len(request.prompt_ids):
                stats.prefill_tokens += len(item.token_ids)
            else:
                stats.decode_tokens += 1
                request.token_ids.append(item.token_ids[0])
            self.blocks.commit(request.alloc, request.token_ids, request.length)
            if item.want_logits:
                rows.append(request)
        if not rows:
            self._flush()
            return
        if logits.shape[-1] == 0:  # a simulated device chose the tokens (runners.simulated)
            if not any(r.penalized or r.matcher is not None or r.params.logprobs
                       for r in rows):  # fmt: skip
                for request, token in zip(rows, self.batch_model.sampled, strict=True):
                    self._emit(request, token)
                self._flush()
                return
            logits = self.batch_model.full_logits()  # what the rows' extras work on
        penalized = [i for i, request in enumerate(rows) if request.penalty is not None]
        sampler = self.sampler
        if penalized:
            sampler.add_rows(logits, penalized, [rows[i].penalty for i in penalized])
        constrained = {
            i: request.matcher for i, request in enumerate(rows) if request.matcher is not None
        }
        if constrained:
            sampler.mask(logits, constrained)
        chosen = sampler.choose(logits, [
            RowParams(
                generator=request.generator,
                temperature=request.params.temperature,
                top_p=request.params.top_p,
                logprobs=request.params.logprobs,
                top_logprobs=request.params.top_logprobs,
            )
            for request in rows
        ])  # fmt: skip
        for request, pick in zip(rows, chosen, strict=True):
            if not pick.finite:  # NaN or inf logits: this request fails, the batch goes on
                logger.error("sampling failed: non-finite logits")
                self._finish(request, cancelled=False)
                request.deliver(RuntimeError("sampling failed: non-finite logits"))
                continue
            verdict = None
            if request.guard is not None:  # it takes the token into the matcher itself
                verdict = request.guard.step(pick.token)
            if verdict is not None and not verdict.accepted or (
                verdict is None and request.matcher is not None
                and not request.matcher.accept(pick.token)
            ):  # fmt: skip
                logger.error("structured output: token %d rejected by its grammar", pick.token)
                self._finish(request, cancelled=False)
                request.deliver(RuntimeError("structured output: grammar rejected a token"))
                continue
            logprob = None
            if pick.logprob is not None:
                logprob = TokenLogprob(token_id=pick.token, logprob=pick.logprob, top=pick.top)
            if verdict is not None and verdict.way is not None:  # it must end now, validly
                self._close_answer(request, pick.token if verdict.keep else None, logprob, verdict)
                continue
            if request.penalized:
                request.penalize(pick.token, logits.shape[-1], sampler)
            # A grammar that ended (on its tokenizer's EOS, when the request named no stop
            # ids) ends the request as a stop token would.
            done = request.matcher is not None and request.matcher.done
            self._emit(request, pick.token, logprob, stop=done)
        self._flush()

    def _flush(self) -> None:
        """Hand this step's tokens over: one wake-up per event loop, not one per token, so the
        serving thread interrupts the model's compute threads once per step."""
        for loop, items in self._outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: its consumers are gone
                for request, _ in items:
                    request.cancelled = True
        self._outbox.clear()

    def _emit(
        self,
        request: _Request,
        token: int,
        logprob: TokenLogprob | None = None,
        *,
        stop: bool = False,
    ) -> None:
        request.produced += 1
        finish: FinishReason | None = None
        if stop or token in request.stop_ids:
            finish = "stop"
        elif (
            request.produced >= request.params.max_new_tokens
            or request.length + 1 >= request.max_length  # no room to feed it back
        ):
            finish = "length"
        request.next_token = token
        if finish is not None:  # out of the batch before the consumer hears it is done
            self._finish(request, cancelled=False)
        chunk = GenerationChunk(
            token_ids=[token], finish_reason=finish, logprobs=None if logprob is None else [logprob]
        )
        self._hand_on(request, chunk)

    def _hand_on(self, request: _Request, chunk: GenerationChunk) -> None:
        """Into this step's outbox: the chunk, with those held before it, once they are due
        (runners.streaming); until then, held."""
        due = [chunk] if request.buffer is None else request.buffer.add(chunk, time.perf_counter())
        if due:
            self._outbox.setdefault(request.loop, []).extend((request, c) for c in due)

    def _close_answer(
        self, request: _Request, token: int | None, logprob: TokenLogprob | None, verdict: Any
    ) -> None:
        """End a constrained answer with the tokens that close it (runners.closing): the
        chosen ``token`` when it is kept, then the way; each closing token has logprob 0, the
        only one the closing allows."""
        tokens = ([] if token is None else [token]) + verdict.way
        entries = None
        if request.params.logprobs:
            entries = [logprob] if token is not None and logprob is not None else []
            entries += [TokenLogprob(token_id=t, logprob=0.0) for t in verdict.way]
        request.produced += len(tokens)
        if verdict.why == "loop":
            self.stats.closed_loop += 1
        else:
            self.stats.closed_budget += 1
        self._finish(request, cancelled=False)
        chunk = GenerationChunk(
            token_ids=tokens, finish_reason="stop", logprobs=entries, closed=verdict.why
        )
        self._hand_on(request, chunk)

    def _finish(self, request: _Request, *, cancelled: bool) -> None:
        """Take the request out of the batch and give its slot back."""
        request.finished = True
        if cancelled:
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        with contextlib.suppress(ValueError):
            self._running.remove(request)
        with contextlib.suppress(ValueError):
            self._waiting.remove(request)
        if request.slot >= 0:
            self.batch_model.release(request.slot)
            self._free_slots.append(request.slot)
            self._free_slots.sort()
            request.slot = -1
        if request.alloc is not None:
            self.blocks.release(request.alloc)
            request.alloc = None
