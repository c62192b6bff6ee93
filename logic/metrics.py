"""The API's Prometheus series, served on ``/metrics`` beside BentoML's own.

Under ``bentoml serve`` every worker writes its samples to the shared
``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` adds them up across workers; in a plain
process they live in the default registry. The runner's load (queue depth, batch size,
cancellations in the engine) is ``llm_runner_*``, see ``runners/llm.py:engine_metrics``.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "llm_api_requests", "Requests to the /v1 routes, by route and HTTP status.", ["route", "status"]
)
REQUEST_SECONDS = Histogram(
    "llm_api_request_duration_seconds",
    "Time from a request's arrival to its last byte (streams included), by route.",
    ["route"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
)
IN_FLIGHT = Gauge(
    "llm_api_requests_in_flight",
    "Requests being served by the API workers (streams until their last byte).",
    multiprocess_mode="livesum",
)
TIME_TO_FIRST_TOKEN = Histogram(
    "llm_api_time_to_first_token_seconds",
    "Time from a generation's start (input checked, prompt tokenized) to its first token.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
INTER_TOKEN_LATENCY = Histogram(
    "llm_api_inter_token_latency_seconds",
    "Time between consecutive tokens of one choice, as the API receives them.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PROMPT_TOKENS = Counter("llm_api_prompt_tokens", "Prompt tokens sent to the model.")
CACHED_PROMPT_TOKENS = Counter(
    "llm_api_cached_prompt_tokens",
    "Prompt tokens the engine found in its prefix cache (not computed); over "
    "llm_api_prompt_tokens, the prefix-hit fraction. Counted where the engine tells.",
)
COMPLETION_TOKENS = Counter(
    "llm_api_completion_tokens", "Tokens the model generated (cancelled generations included)."
)
CANCELLED = Counter(
    "llm_api_generations_cancelled",
    "Generations stopped before their end: the client left, or a deadline passed.",
    ["reason"],
)
CLOSED = Counter(
    "llm_api_structured_closed",
    "Constrained answers the runner closed early and validly: as their budget ran out "
    "(budget), or where they repeated themselves (loop).",
    ["reason"],
)
ERRORS = Counter(
    "llm_api_errors", "Errors returned to clients (as a status or a stream error event).", ["code"]
)


class GenerationMetrics:
    """One request's generation, recorded as it goes: time to first token, the gap between
    tokens of each choice, token counts, and how it ended."""

    def __init__(self, prompt_tokens: int):
        self._start = time.perf_counter()
        self._last: dict[int, float] = {}
        self.time_to_first_token: float | None = None
        self.completion_tokens = 0
        PROMPT_TOKENS.inc(prompt_tokens)

    def tokens(self, choice: int, count: int) -> None:
        """``count`` tokens of ``choice`` arrived now."""
        if count <= 0:
            return
        now = time.perf_counter()
        if self.time_to_first_token is None:
            self.time_to_first_token = now - self._start
            TIME_TO_FIRST_TOKEN.observe(self.time_to_first_token)
        elif choice in self._last:
            gap = (now - self._last[choice]) / count  # a chunk may carry several tokens
            for _ in range(count):
                INTER_TOKEN_LATENCY.observe(gap)
        self._last[choice] = now
        self.completion_tokens += count
        COMPLETION_TOKENS.inc(count)

    def cached(self, tokens: int) -> None:
        """The engine found ``tokens`` of the prompt in its prefix cache."""
        CACHED_PROMPT_TOKENS.inc(tokens)

    def closed(self, reason: str) -> None:
        """The runner closed a constrained answer early (runners/closing.py)."""
        CLOSED.labels(reason=reason).inc()

    def cancelled(self, reason: str) -> None:
        CANCELLED.labels(reason=reason).inc()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start
