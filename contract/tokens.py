"""The token-level contract between the API and the runner: what a generation asks for
(prompt ids aside) and what comes back, one chunk at a time.

Plain pydantic, no torch: the API builds :class:`SamplingParams` and reads
:class:`GenerationChunk` s; every engine behind the runner takes and yields the same.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MAX_TOP_LOGPROBS = 20  # OpenAI's bound


class StructuredOutput(BaseModel):
    """Constrained decoding: the runner lets only tokens that keep the answer valid be chosen.

    ``json_object``: any JSON object. ``json_schema``: a JSON value matching ``json_schema``
    (the schema as JSON text, so runners compile and cache it by its exact text). Answers are
    compact JSON: no free runs of whitespace for a small model to wander in.

    ``structural_tag``: text shaped by ``structural_tag``, an xgrammar structural tag as JSON
    text (``{"type": "structural_tag", "format": ...}``), the form both xgrammar and vLLM
    take: e.g. free text until ``<tool_call>``, then JSON matching a schema (tool calls).
    """

    kind: Literal["json_object", "json_schema", "structural_tag"]
    json_schema: str | None = None
    structural_tag: str | None = None

    @property
    def param(self) -> str:
        """The request parameter it comes from, for errors about it."""
        return "tools" if self.kind == "structural_tag" else "response_format"


class SamplingParams(BaseModel):
    """What the business logic asks of the runner, besides the prompt's token ids."""

    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    # OpenAI's penalties: logit -= presence * [token generated] + frequency * its count,
    # over the tokens this request has generated so far (not the prompt).
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # Log-probabilities of each chosen token (after penalties and temperature, before top-p),
    # and of the ``top_logprobs`` most likely alternatives.
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    structured: StructuredOutput | None = None


FinishReason = Literal["stop", "length"]


class TokenLogprob(BaseModel):
    """A generated token's log-probability, and the most likely alternatives at its step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = Field(default_factory=list)  # (token id, logprob), best first


class GenerationChunk(BaseModel):
    """One step of a runner's stream: new token ids, and why it ended on the last one.

    ``logprobs`` has one entry per token id when the request asked for them, else None.
    ``closed``, on the last chunk of a constrained answer the runner ended early and validly
    (``finish_reason`` "stop"): why, ``budget`` (its tokens were running out) or ``loop`` (it
    repeated itself); see runners/closing.py.
    ``cached_tokens``, on the first chunk of engines that can tell, is how many prompt tokens
    the engine found in its prefix cache (their KV reused, not computed): OpenAI's
    ``usage.prompt_tokens_details.cached_tokens``.
    """

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    cached_tokens: int | None = None
    closed: Literal["budget", "loop"] | None = None
