"""What the runner service needs of an engine, whichever engine it is; torch-free.

Engines stand behind the runner's token-id API: our own continuous-batching engine
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

from contract.errors import EngineRequestError
from contract.tokens import GenerationChunk, SamplingParams

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
    # Constrained answers the runner closed early, validly (runners/closing.py): at their
    # budget, and in a loop.
    closed_budget: int = 0
    closed_loop: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)


class Engine(Protocol):
    """A generation engine behind the runner: token ids and sampling parameters in,
    :class:`GenerationChunk` s out.

    ``stream`` raises :class:`~contract.errors.EngineBusyError` when the engine already
    holds ``max_in_flight`` requests, :class:`~contract.errors.EngineRequestError` for a
    request it cannot serve as asked, and :class:`~contract.errors.EngineClosedError`
    once it stopped. Closing the stream early cancels the request in the engine.
    """

    name: str  # "native" or "vllm": labels the engine in metrics and logs
    stats: EngineStats
    max_batch_size: int
    max_in_flight: int
    context_length: int  # prompt plus answer, in tokens

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise :class:`~contract.errors.EngineRequestError` for what ``stream`` would
        refuse; ``stream`` calls it first."""
        ...

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
