"""What the runner service needs of an engine, whichever engine it is; torch-free.

Two engines stand behind the runner's token-id API: our own continuous-batching engine
(:mod:`runners.engine`, ``native``) and vLLM (:mod:`runners.vllm_engine`). The runner service,
the monolith, their metrics, limits, cancellation and health checks see only :class:`Engine`,
so they work the same on either. The interface is kept to what those callers use: streaming,
its load, its counters and whether it still runs. An engine's own knobs live in its
constructor and in the settings.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from logic.protocol import GenerationChunk, SamplingParams
from runners.engine_errors import EngineRequestError

MetricKind = Literal["gauge", "counter"]
# Temperatures this small are argmax in all but name, on every engine (vLLM's own threshold).
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Series:
    """One Prometheus series an engine exports besides the common ones."""

    name: str  # without the ``llm_runner_`` prefix
    kind: MetricKind
    help: str
    value: float


@dataclass
class EngineStats:
    """Counters for metrics, logs, tests and benchmarks; every engine keeps them."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    refused: int = 0  # turned away at once: max_in_flight reached
    busy_seconds: float = 0.0  # wall time in steps (forward pass and sampling)
    max_running: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)


class Engine(Protocol):
    """A generation engine behind the runner: token ids and sampling parameters in,
    :class:`GenerationChunk` s out.

    ``stream`` raises :class:`~runners.engine_errors.EngineBusyError` when the engine already
    holds ``max_in_flight`` requests, :class:`~runners.engine_errors.EngineRequestError` for a
    request it cannot serve as asked, and :class:`~runners.engine_errors.EngineClosedError`
    once it stopped. Closing the stream early cancels the request in the engine.
    """

    name: str  # "native" or "vllm": labels the engine in metrics and logs
    stats: EngineStats
    max_batch_size: int
    max_in_flight: int

    def stream(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]: ...

    @property
    def closed(self) -> bool:
        """True once the engine stopped or died: it takes no more requests."""
        ...

    @property
    def running(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    def extra_metrics(self) -> list[Series]:
        """Series only this engine has (KV-cache usage, prefix-cache hits, ...)."""
        ...

    def close(self) -> None:
        """Stop the engine; requests still in it fail with ``EngineClosedError``."""
        ...


def check_prompt(prompt_ids: list[int], *, context_length: int, vocab_size: int) -> None:
    """What every engine refuses in a prompt, with the same 400 on each."""
    if not prompt_ids:
        raise EngineRequestError("The prompt is empty.")
    if len(prompt_ids) >= context_length:
        raise EngineRequestError(
            f"This model's maximum context length is {context_length} tokens; the prompt has "
            f"{len(prompt_ids)}.",
            code="context_length_exceeded",
        )
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise EngineRequestError(
            f"Prompt token ids must be in 0..{vocab_size - 1}.", param="prompt_ids"
        )


def engine_metrics(engine: Engine) -> str:
    """The engine's load in Prometheus text format, for autoscalers and dashboards.

    ``llm_runner_requests_in_flight`` (running + waiting) is what the Kubernetes
    HorizontalPodAutoscaler of the runner scales on. The same series come from every engine,
    then the engine's own (:meth:`Engine.extra_metrics`).
    """
    stats = engine.stats
    series = [
        Series("requests_running", "gauge", "Sequences in the running batch.", engine.running),
        Series("requests_waiting", "gauge", "Requests queued for a batch slot.", engine.waiting),
        Series(
            "requests_in_flight",
            "gauge",
            "Requests running or waiting: the runner's autoscaling metric.",
            engine.running + engine.waiting,
        ),
        Series("batch_slots", "gauge", "Most sequences in one step.", engine.max_batch_size),
        Series("max_in_flight", "gauge", "Requests held at most; more get a 429.",
               engine.max_in_flight),
        Series("engine_up", "gauge", "1 while the engine takes requests, 0 once it stopped.",
               int(not engine.closed)),
        Series("steps_total", "counter", "Forward steps run.", stats.steps),
        Series("busy_seconds_total", "counter", "Seconds spent in steps (forward pass and "
               "sampling): its rate is the model's busy fraction.", round(stats.busy_seconds, 6)),
        Series("prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats.prefill_tokens),
        Series("decode_tokens_total", "counter", "Tokens decoded after each first.",
               stats.decode_tokens),
        Series("requests_finished_total", "counter", "Requests that ran to the end.",
               stats.finished),
        Series("requests_cancelled_total", "counter", "Requests whose client left.",
               stats.cancelled),
        Series("requests_refused_total", "counter", "Requests turned away at max_in_flight "
               "(a 429).", stats.refused),
        *engine.extra_metrics(),
    ]  # fmt: skip
    lines = [
        "# HELP llm_runner_engine_info The engine behind the runner (value always 1).",
        "# TYPE llm_runner_engine_info gauge",
        f'llm_runner_engine_info{{engine="{engine.name}"}} 1',
    ]
    for one in series:
        lines += [
            f"# HELP llm_runner_{one.name} {one.help}",
            f"# TYPE llm_runner_{one.name} {one.kind}",
            f"llm_runner_{one.name} {one.value}",
        ]
    return "\n".join(lines) + "\n"
