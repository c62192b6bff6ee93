"""Chat completions: the whole CPU-side request path around a token generator.

request -> model check -> prompt policy -> chat template -> tokenize -> length check
        -> token ids ==> generator (the runner) ==> token ids
        -> detokenize -> stop strings -> cleanup -> usage -> response or stream chunks

The generator is any async function from prompt ids and sampling parameters to
:class:`GenerationChunk` s: the remote runner in the split topology, the in-process engine
in the monolith, a fake in tests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from logic.cleanup import OutputCleaner
from logic.errors import InvalidRequestError, ModelNotFoundError, RunnerUnavailableError
from logic.model_files import ModelFiles
from logic.prompt import apply_prompt_policy
from logic.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    FinishReason,
    GenerationChunk,
    ModelCard,
    ModelList,
    SamplingParams,
    Usage,
    new_completion_id,
)
from logic.settings import Settings
from logic.stops import StopStringMatcher
from logic.tokenizer import IncrementalDetokenizer

TokenGenerator = Callable[[list[int], SamplingParams], AsyncIterator[GenerationChunk]]


@dataclass(frozen=True)
class PreparedPrompt:
    """A validated request, ready for the runner."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_strings: list[str]


@dataclass
class _Progress:
    """What one generation has produced so far."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None

    @property
    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


class ChatCompletionService:
    """Serves ``/v1/chat/completions`` and ``/v1/models`` over a token generator."""

    def __init__(
        self,
        files: ModelFiles,
        settings: Settings,
        generate: TokenGenerator,
        *,
        fingerprint: str | None = None,
    ):
        self._files = files
        self._settings = settings
        self._generate = generate
        self._fingerprint = fingerprint
        self._created = int(time.time())

    @property
    def model_name(self) -> str:
        return self._settings.model_name

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self._created)])

    # ------------------------------------------------------------ pre-processing

    def prepare(self, request: ChatCompletionRequest) -> PreparedPrompt:
        """Everything before the runner; raises a 4xx :class:`APIError` on bad input."""
        if request.model is not None and request.model != self.model_name:
            raise ModelNotFoundError(request.model)
        messages = apply_prompt_policy(
            request.messages,
            default_system_prompt=self._settings.effective_system_prompt,
        )
        prompt_ids = self._files.tokenizer.encode(self._files.template.render(messages))
        max_new_tokens = self._completion_budget(request, len(prompt_ids))
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            stop_token_ids=self._files.stop_token_ids,
        )
        # Template markers leaking as plain text end the turn as surely as the EOS token.
        stops = request.stop_strings + self._files.template_markers
        return PreparedPrompt(prompt_ids=prompt_ids, params=params, stop_strings=stops)

    def _completion_budget(self, request: ChatCompletionRequest, prompt_tokens: int) -> int:
        window = self._files.context_length
        if prompt_tokens >= window:
            raise InvalidRequestError(
                f"This model's maximum context length is {window} tokens. However, your "
                f"messages resulted in {prompt_tokens} tokens. Please reduce the length of "
                "the messages.",
                param="messages",
                code="context_length_exceeded",
            )
        requested = request.requested_max_tokens
        if requested is None:
            return min(self._settings.default_max_tokens, window - prompt_tokens)
        if prompt_tokens + requested > window:
            param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
            raise InvalidRequestError(
                f"This model's maximum context length is {window} tokens. However, you "
                f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the "
                f"messages, {requested} in the completion). Please reduce the length of the "
                f"messages or the completion.",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    # ------------------------------------------------------------ generation and post-processing

    async def _text_deltas(
        self, prepared: PreparedPrompt, progress: _Progress
    ) -> AsyncIterator[str]:
        """Cleaned text, one piece per runner chunk (maybe empty); fills ``progress``."""
        detokenizer = IncrementalDetokenizer(self._files.tokenizer)
        stops = StopStringMatcher(prepared.stop_strings)
        cleaner = OutputCleaner()
        stop_ids = set(prepared.params.stop_token_ids)

        # aclosing: leaving early (a stop string) closes the runner stream, which cancels it.
        stream = self._generate(prepared.prompt_ids, prepared.params)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                progress.completion_tokens += len(chunk.token_ids)
                ids = chunk.token_ids
                if chunk.finish_reason == "stop" and ids and ids[-1] in stop_ids:
                    ids = ids[:-1]  # the stop token is counted, never shown
                text = cleaner.push(stops.push(detokenizer.push(ids)))
                if chunk.finish_reason is not None and not stops.stopped:
                    text += cleaner.push(stops.push(detokenizer.flush()) + stops.flush())
                    progress.finish_reason = chunk.finish_reason
                if stops.stopped:  # a stop string wins, even one completed by the flush
                    progress.finish_reason = "stop"
                yield text  # may be empty: callers learn that the runner answered
                if progress.finish_reason is not None:
                    return
        # The runner's stream ended without a finish reason: it died or was cut off.
        raise RunnerUnavailableError("The model runner ended the generation unexpectedly.")

    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        """A whole answer."""
        prepared = self.prepare(request)
        progress = _Progress(prompt_tokens=len(prepared.prompt_ids))
        async with contextlib.aclosing(self._text_deltas(prepared, progress)) as deltas:
            parts = [text async for text in deltas]
        assert progress.finish_reason is not None
        return ChatCompletionResponse(
            model=self.model_name,
            system_fingerprint=self._fingerprint,
            choices=[
                ChatCompletionChoice(
                    message=AssistantMessage(content="".join(parts)),
                    finish_reason=progress.finish_reason,
                )
            ],
            usage=progress.usage,
        )

    def create_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Validates now (so bad input fails before any byte is sent), then streams chunks."""
        prepared = self.prepare(request)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return self._stream(prepared, include_usage)

    async def _stream(
        self, prepared: PreparedPrompt, include_usage: bool
    ) -> AsyncIterator[ChatCompletionChunk]:
        progress = _Progress(prompt_tokens=len(prepared.prompt_ids))
        completion_id, created = new_completion_id(), int(time.time())

        def chunk(delta: DeltaMessage, finish: FinishReason | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=self.model_name,
                system_fingerprint=self._fingerprint,
                choices=[ChatCompletionChunkChoice(delta=delta, finish_reason=finish)],
            )

        started = False
        # aclosing: a client that leaves closes this stream, and with it the runner's.
        async with contextlib.aclosing(self._text_deltas(prepared, progress)) as deltas:
            async for text in deltas:
                # The role chunk waits for the runner's first token, so a runner that cannot
                # answer fails the request before any byte is sent (with a proper status).
                if not started:
                    started = True
                    yield chunk(DeltaMessage(role="assistant", content=""))
                if text:
                    yield chunk(DeltaMessage(content=text))
        yield chunk(DeltaMessage(), progress.finish_reason)
        if include_usage:
            yield ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=self.model_name,
                system_fingerprint=self._fingerprint,
                choices=[],
                usage=progress.usage,
            )
