"""How often a generation's tokens are handed on: a few tokens per chunk, never held long.

Every chunk a runner streams costs the same whatever it carries: a wake-up of the runner's
event loop, a socket write, a wake-up and a pass through the API's pipeline (detokenize,
stop strings, an SSE event), a socket write, and the client's own wake-up and parse. On a
host where the model shares its cores with that work (llama.cpp on a CPU), each of them
preempts one of the model's threads mid-step; on a GPU host they are the API's CPU bill. So
a stream's tokens go out ``interval`` at a time (SGLang's and vLLM's ``stream_interval``),
with three exceptions that keep it responsive: the first token goes at once (time to first
token is unchanged), the last at once (so is the answer's end), and a token is held only if
it would still go within ``max_delay`` seconds, the next token expected one step (as long as
the last one) later. So at slow steps (longer than ``max_delay``: a long prompt joining the
batch, a loaded host) every token goes as it comes, and no token waits much past the delay.
At 1 token per chunk the API's SSE events are token by token.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.tokens import GenerationChunk


@dataclass(frozen=True)
class StreamOptions:
    """``LLM_STREAM_INTERVAL`` and ``LLM_STREAM_MAX_DELAY_MS`` (runners/settings.py)."""

    interval: int = 2  # tokens per chunk at most (1: every token as it comes)
    max_delay: float = 0.05  # seconds a token may wait for the ones it goes with (the module)


class StreamBuffer:
    """One stream's tokens waiting to be handed on: :meth:`add` returns the chunks that are
    due now (all it holds, in order), or nothing while they may wait."""

    __slots__ = ("options", "held", "tokens", "since", "last", "started")

    def __init__(self, options: StreamOptions):
        self.options = options
        self.held: list[GenerationChunk] = []
        self.tokens = 0
        self.since = 0.0  # when the oldest chunk held came
        self.last = 0.0  # when the last chunk came
        self.started = False  # the first chunk went

    def add(self, chunk: GenerationChunk, now: float) -> list[GenerationChunk]:
        step, self.last = now - self.last, now
        if not self.held:
            self.since = now
        self.held.append(chunk)
        self.tokens += len(chunk.token_ids)
        if (
            self.started
            and chunk.finish_reason is None
            and self.tokens < self.options.interval
            # the next chunk, a step like the last away, would still find the oldest in time
            and now + step - self.since < self.options.max_delay
        ):
            return []
        due, self.held, self.tokens, self.started = self.held, [], 0, True
        return due


def merge(chunks: list[GenerationChunk]) -> GenerationChunk:
    """Consecutive chunks of one stream as one: their tokens (and logprobs) in order; the
    first's ``cached_tokens``, the last's finish."""
    if len(chunks) == 1:
        return chunks[0]
    ids: list[int] = []
    logprobs = None
    for chunk in chunks:
        ids += chunk.token_ids
        if chunk.logprobs is not None:
            logprobs = (logprobs or []) + chunk.logprobs
    last = chunks[-1]
    return GenerationChunk(
        token_ids=ids,
        finish_reason=last.finish_reason,
        logprobs=logprobs,
        cached_tokens=chunks[0].cached_tokens,
        closed=last.closed,
    )
