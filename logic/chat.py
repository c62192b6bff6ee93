"""Chat completions: the whole CPU-side request path around a token generator.

request -> model check -> prompt policy -> chat template -> tokenize -> length check
        -> token ids ==> generator (the runner) ==> token ids
        -> detokenize -> stop strings -> cleanup -> usage -> response or stream chunks

The generator is any async function from prompt ids and sampling parameters to
:class:`GenerationChunk` s: the remote runner in the split topology, the in-process engine
in the monolith, a fake in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from contract.tokens import (
    FinishReason,
    GenerationChunk,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
)
from logic import response_format
from logic.cleanup import OutputCleaner
from logic.deadlines import within_deadlines
from logic.errors import (
    GenerationTimeoutError,
    InvalidRequestError,
    ModelNotFoundError,
    RunnerUnavailableError,
)
from logic.metrics import GenerationMetrics
from logic.model_files import ModelFiles
from logic.output_plan import FREE, OutputPlan, plan_output, with_instructions
from logic.pipeline import Conversation, Pipeline
from logic.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceFinishReason,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    GenerationRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
    new_completion_id,
    new_text_completion_id,
)
from logic.settings import APISettings
from logic.stops import StopStringMatcher
from logic.tokenizer import IncrementalDetokenizer
from logic.tools import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    Event,
    ToolCallParser,
    ToolPlan,
    history,
    tool_calls,
)

logger = logging.getLogger(__name__)
TokenGenerator = Callable[[list[int], SamplingParams], AsyncIterator[GenerationChunk]]


@dataclass(frozen=True)
class PreparedPrompt:
    """A validated request, ready for the runner."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_strings: list[str]
    n: int = 1
    output: OutputPlan = FREE  # what the answer must be (tools, response_format)

    def params_for(self, index: int) -> SamplingParams:
        """Choice ``index``'s parameters: a seeded request gives each choice its own seed."""
        if index == 0 or self.params.seed is None:
            return self.params
        return self.params.model_copy(update={"seed": (self.params.seed + index) % 2**64})


@dataclass
class _Choice:
    """What one choice has produced so far."""

    index: int
    completion_tokens: int = 0
    cached_tokens: int | None = None  # prompt tokens the engine's prefix cache held
    finish_reason: FinishReason | None = None
    closed: str | None = None  # why the runner closed a constrained answer early, if it did
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobEntry] = field(default_factory=list)


def _usage(prompt_tokens: int, choices: list[_Choice]) -> Usage:
    """The prompt counts once, every choice's tokens count. Cached: the prompt tokens no
    choice had to compute (the fewest any choice found cached), where the engine tells."""
    completion = sum(c.completion_tokens for c in choices)
    cached = [c.cached_tokens for c in choices if c.cached_tokens is not None]
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=min(cached)) if cached else None,
    )


class CompletionService:
    """Serves OpenAI's ``/v1/chat/completions``, ``/v1/completions`` (text, no template)
    and ``/v1/models`` over a token generator: one business-logic pipeline for all three."""

    def __init__(
        self,
        files: ModelFiles,
        settings: APISettings,
        generate: TokenGenerator,
        *,
        fingerprint: str | None = None,
    ):
        self._files = files
        self._settings = settings
        self._generate = generate
        self._fingerprint = fingerprint
        self._created = int(time.time())
        pre = ["redact_pii"] if settings.redact_pii else []
        self.pipeline = Pipeline.from_settings(
            settings,
            pre=pre + _names(settings.pre_steps),
            post=_names(settings.post_steps),
            answer=_names(settings.answer_steps),
        )

    @property
    def model_name(self) -> str:
        return self._settings.model_name

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self._created)])

    # ------------------------------------------------------------ pre-processing

    def prepare(self, request: ChatCompletionRequest) -> PreparedPrompt:
        """Everything before the runner; raises a 4xx :class:`APIError` on bad input."""
        self._check(request)
        if request.top_logprobs and not request.logprobs:
            raise InvalidRequestError(
                "'top_logprobs' requires 'logprobs' to be true.",
                param="top_logprobs",
                code="invalid_value",
            )
        native = self._files.template.takes_tools
        plan = plan_output(request, native_tools=native)
        conversation = self.pipeline.before(
            Conversation.from_messages(history(request.messages, native=native))
        )
        # After the pre-steps: they refuse a request first (input limits, your own checks).
        response_format.check(plan.response_format)
        messages = with_instructions(conversation.messages, plan.instructions)
        prompt_ids = self._files.encode_conversation(messages, tools=plan.template_tools)
        # Template markers leaking as plain text end the turn as surely as the EOS token.
        stops = request.stop_strings + self._files.template_markers
        return PreparedPrompt(
            prompt_ids=prompt_ids,
            params=self._sampling_params(request, len(prompt_ids), plan.structured),
            stop_strings=stops,
            n=request.n,
            output=plan,
        )

    def _check(self, request: GenerationRequest) -> None:
        """What both endpoints check first: the model, and the user to log."""
        if request.model is not None and request.model != self.model_name:
            raise ModelNotFoundError(request.model)
        if request.user:
            logger.info("request for user %r", request.user)

    def _sampling_params(
        self,
        request: GenerationRequest,
        prompt_tokens: int,
        structured: StructuredOutput | None = None,
    ) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self._completion_budget(request, prompt_tokens),
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            stop_token_ids=self._files.stop_token_ids,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            logprobs=request.wants_logprobs,
            top_logprobs=request.top_logprob_count,
            structured=structured,
        )

    def _completion_budget(self, request: GenerationRequest, prompt_tokens: int) -> int:
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
            param = (
                "max_completion_tokens"
                if getattr(request, "max_completion_tokens", None)
                else "max_tokens"
            )
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

    def _logprob_entry(self, logprob: TokenLogprob) -> TokenLogprobEntry:
        def describe(token_id: int) -> tuple[str, list[int]]:
            raw = self._files.tokenizer.token_bytes(token_id)
            return raw.decode("utf-8", errors="replace"), list(raw)

        token, raw = describe(logprob.token_id)
        top = []
        for token_id, value in logprob.top:
            text, raw_top = describe(token_id)
            top.append(TopLogprob(token=text, logprob=value, bytes=raw_top))
        return TokenLogprobEntry(token=token, logprob=logprob.logprob, bytes=raw, top_logprobs=top)

    async def _pieces(
        self, prepared: PreparedPrompt, choice: _Choice, metrics: GenerationMetrics
    ) -> AsyncIterator[tuple[str, list[TokenLogprobEntry]]]:
        """Cleaned text and the logprobs of its tokens, one piece per runner chunk (the text
        may be empty); fills ``choice``."""
        detokenizer = IncrementalDetokenizer(self._files.tokenizer)
        stops = StopStringMatcher(prepared.stop_strings)
        cleaner = OutputCleaner()
        params = prepared.params_for(choice.index)
        stop_ids = set(params.stop_token_ids)
        answer: list[str] = []  # for the answer steps, once it is complete

        # aclosing: leaving early (a stop string, a deadline) closes the runner stream, which
        # cancels the generation.
        stream = within_deadlines(
            self._generate(prepared.prompt_ids, params),
            total=self._settings.api_timeout,
            idle=self._settings.stream_idle_timeout,
        )
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                if chunk.cached_tokens is not None and choice.cached_tokens is None:
                    choice.cached_tokens = chunk.cached_tokens
                    if choice.index == 0:  # the prompt counts once
                        metrics.cached(chunk.cached_tokens)
                if chunk.closed is not None:
                    choice.closed = chunk.closed
                    metrics.closed(chunk.closed)
                choice.completion_tokens += len(chunk.token_ids)
                metrics.tokens(choice.index, len(chunk.token_ids))
                ids, logprobs = chunk.token_ids, chunk.logprobs or []
                if chunk.finish_reason == "stop" and ids and ids[-1] in stop_ids:
                    ids, logprobs = ids[:-1], logprobs[: len(ids) - 1]  # counted, never shown
                entries = [self._logprob_entry(lp) for lp in logprobs] if params.logprobs else []
                text = cleaner.push(stops.push(detokenizer.push(ids)))
                if chunk.finish_reason is not None and not stops.stopped:
                    text += cleaner.push(stops.push(detokenizer.flush()) + stops.flush())
                    choice.finish_reason = chunk.finish_reason
                if stops.stopped:  # a stop string wins, even one completed by the flush
                    choice.finish_reason = "stop"
                if self.pipeline.answer:
                    answer.append(text)
                    if choice.finish_reason is not None:
                        self.pipeline.check("".join(answer))
                yield text, entries  # text may be empty: callers learn the runner answered
                if choice.finish_reason is not None:
                    return
        # The runner's stream ended without a finish reason: it died or was cut off.
        raise RunnerUnavailableError("The model runner ended the generation unexpectedly.")

    async def _merged(
        self, prepared: PreparedPrompt, choices: list[_Choice]
    ) -> AsyncIterator[tuple[_Choice, str | None, list[TokenLogprobEntry]]]:
        """Every choice's pieces as they come, each choice generating concurrently (so the
        runner batches them); ``(choice, None, [])`` when a choice is done. Closing this
        closes every choice's runner stream. Records the generation's metrics and logs it."""
        metrics = GenerationMetrics(len(prepared.prompt_ids))
        if len(choices) == 1:  # the common case: no task and no queue between the two
            pieces = self._one_choice(prepared, choices[0], metrics)
        else:
            pieces = self._all_choices(prepared, choices, metrics)
        outcome = "cancelled"  # unless it finishes or fails: the consumer left early
        try:
            async for item in pieces:
                yield item
            outcome = "finished"
        except GenerationTimeoutError:
            outcome = "timeout"
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            # Recorded before the first await: a cancelled task (the client left) may be
            # cancelled again at each await that follows.
            if outcome in ("cancelled", "timeout"):
                metrics.cancelled("client_left" if outcome == "cancelled" else "timeout")
            _log_generation(prepared, choices, metrics, outcome)
            await pieces.aclose()

    async def _one_choice(
        self, prepared: PreparedPrompt, choice: _Choice, metrics: GenerationMetrics
    ) -> AsyncIterator[tuple[_Choice, str | None, list[TokenLogprobEntry]]]:
        async with contextlib.aclosing(self._pieces(prepared, choice, metrics)) as pieces:
            async for text, entries in pieces:
                yield choice, text, entries
        yield choice, None, []

    async def _all_choices(
        self, prepared: PreparedPrompt, choices: list[_Choice], metrics: GenerationMetrics
    ) -> AsyncIterator[tuple[_Choice, str | None, list[TokenLogprobEntry]]]:
        """The choices' pieces in the order they come, each choice pumped by a task of its
        own; a choice's failure is raised here. Closing this cancels the tasks."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: _Choice) -> None:
            try:
                pieces = self._pieces(prepared, choice, metrics)
                async with contextlib.aclosing(pieces):
                    async for text, entries in pieces:
                        queue.put_nowait((choice, text, entries))
                queue.put_nowait((choice, None, []))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - re-raised by the consumer below
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(pump(choice)) for choice in choices]
        try:
            remaining = len(choices)
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item[1] is None:
                    remaining -= 1
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, prepared: PreparedPrompt) -> list[_Choice]:
        """Every choice, whole."""
        choices = [_Choice(index) for index in range(prepared.n)]
        async with contextlib.aclosing(self._merged(prepared, choices)) as pieces:
            async for choice, text, entries in pieces:
                if text is not None:
                    choice.text.append(text)
                    choice.logprobs += entries
        return choices

    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        """A whole answer (``n`` of them)."""
        prepared = self.prepare(request)
        choices = await self._collect(prepared)
        answers = [self._answer(prepared, c) for c in choices]
        return ChatCompletionResponse(
            model=self.model_name,
            system_fingerprint=self._fingerprint,
            choices=[
                ChatCompletionChoice(
                    index=c.index,
                    message=message,
                    finish_reason=finish,
                    logprobs=ChoiceLogprobs(content=c.logprobs) if request.logprobs else None,
                )
                for c, (message, finish) in zip(choices, answers, strict=True)
            ],
            usage=_usage(len(prepared.prompt_ids), choices),
        )

    def _answer(
        self, prepared: PreparedPrompt, choice: _Choice
    ) -> tuple[AssistantMessage, ChoiceFinishReason]:
        """A whole choice as the assistant's message: its text (after the post-steps, in the
        format asked for), or its content and tool calls."""
        text = "".join(choice.text)
        if prepared.output.tools is None:
            content = response_format.enforce(
                prepared.output.response_format,
                self.pipeline.after(text),
                cut=_cut(prepared, choice),
            )
            return AssistantMessage(content=content), choice.finish_reason or "stop"
        parser = ToolCallParser(prepared.output.tools)
        events = parser.push(text) + parser.close(cut=_cut(prepared, choice))
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        calls = tool_calls(parser)
        message = AssistantMessage(
            content=self.pipeline.after(content) if content or not calls else None,
            tool_calls=calls,
        )
        return message, _finish(choice, prepared.output.tools, calls is not None)

    def create_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Validates now (so bad input fails before any byte is sent), then streams chunks."""
        return self._stream(self.prepare(request), request.include_usage, request.logprobs)

    async def _stream(
        self, prepared: PreparedPrompt, include_usage: bool, logprobs: bool
    ) -> AsyncIterator[ChatCompletionChunk]:
        choices = [_Choice(index) for index in range(prepared.n)]
        completion_id, created = new_completion_id(), int(time.time())

        def chunk(
            index: int,
            delta: DeltaMessage,
            finish: ChoiceFinishReason | None = None,
            entries: list[TokenLogprobEntry] | None = None,
        ) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=self.model_name,
                system_fingerprint=self._fingerprint,
                choices=[
                    ChatCompletionChunkChoice(
                        index=index,
                        delta=delta,
                        finish_reason=finish,
                        logprobs=ChoiceLogprobs(content=entries) if entries else None,
                    )
                ],
            )

        started: set[int] = set()
        parsers = {
            c.index: ToolCallParser(prepared.output.tools) for c in choices if prepared.output.tools
        }
        # aclosing: a client that leaves closes this stream, and with it the runner's.
        async with contextlib.aclosing(self._merged(prepared, choices)) as pieces:
            async for choice, text, entries in pieces:
                parser = parsers.get(choice.index)
                if text is None:
                    # A format the answer fails, or a tool call cut short, ends the stream
                    # with a 422-shaped error event.
                    cut = _cut(prepared, choice)
                    response_format.enforce(
                        prepared.output.response_format, "".join(choice.text), cut=cut
                    )
                    if parser is not None:
                        for event in parser.close(cut=cut):
                            yield chunk(choice.index, _delta(event))
                    finish = _finish(choice, prepared.output.tools, bool(parser and parser.calls))
                    yield chunk(choice.index, DeltaMessage(), finish)
                    continue
                choice.text.append(text)
                # A choice's role chunk waits for its first token, so a runner that cannot
                # answer fails the request before any byte is sent (with a proper status).
                if choice.index not in started:
                    started.add(choice.index)
                    yield chunk(choice.index, DeltaMessage(role="assistant", content=""))
                if parser is not None:
                    deltas = [_delta(event) for event in parser.push(text)]
                    if logprobs and entries and not deltas:
                        deltas = [DeltaMessage(content="")]
                    for i, delta in enumerate(deltas):  # logprobs go with the first
                        yield chunk(choice.index, delta, None, entries if i == 0 else None)
                elif text or (logprobs and entries):
                    yield chunk(choice.index, DeltaMessage(content=text), None, entries)
        if include_usage:
            yield ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=self.model_name,
                system_fingerprint=self._fingerprint,
                choices=[],
                usage=_usage(len(prepared.prompt_ids), choices),
            )

    # ------------------------------------------------------------ text completions

    def prepare_completion(self, request: CompletionRequest) -> PreparedPrompt:
        """``/v1/completions``: the prompt is raw text, no template, no system prompt."""
        self._check(request)
        prompt_ids = self._files.tokenizer.encode(request.text)
        if not prompt_ids:
            raise InvalidRequestError("'prompt' is empty.", param="prompt", code="invalid_value")
        return PreparedPrompt(
            prompt_ids=prompt_ids,
            params=self._sampling_params(request, len(prompt_ids)),
            stop_strings=request.stop_strings,
            n=request.n,
        )

    @staticmethod
    def _completion_logprobs(entries: list[TokenLogprobEntry], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for entry in entries:
            out.tokens.append(entry.token)
            out.token_logprobs.append(entry.logprob)
            out.top_logprobs.append({top.token: top.logprob for top in entry.top_logprobs})
            out.text_offset.append(offset)
            offset += len(entry.token)
        return out

    async def create_completion(self, request: CompletionRequest) -> CompletionResponse:
        prepared = self.prepare_completion(request)
        choices = await self._collect(prepared)
        offset = len(request.text)
        return CompletionResponse(
            model=self.model_name,
            system_fingerprint=self._fingerprint,
            choices=[
                CompletionChoice(
                    index=c.index,
                    text="".join(c.text),
                    finish_reason=c.finish_reason,
                    logprobs=(
                        self._completion_logprobs(c.logprobs, offset)
                        if request.logprobs is not None
                        else None
                    ),
                )
                for c in choices
            ],
            usage=_usage(len(prepared.prompt_ids), choices),
        )

    def create_completion_stream(
        self, request: CompletionRequest
    ) -> AsyncIterator[CompletionResponse]:
        return self._completion_stream(self.prepare_completion(request), request)

    async def _completion_stream(
        self, prepared: PreparedPrompt, request: CompletionRequest
    ) -> AsyncIterator[CompletionResponse]:
        choices = [_Choice(index) for index in range(prepared.n)]
        completion_id, created = new_text_completion_id(), int(time.time())
        offsets = {c.index: len(request.text) for c in choices}

        def chunk(choice_list: list[CompletionChoice], usage: Usage | None = None):
            return CompletionResponse(
                id=completion_id,
                created=created,
                model=self.model_name,
                system_fingerprint=self._fingerprint,
                choices=choice_list,
                usage=usage,
            )

        async with contextlib.aclosing(self._merged(prepared, choices)) as pieces:
            async for choice, text, entries in pieces:
                if text is None:
                    done = CompletionChoice(
                        index=choice.index, text="", finish_reason=choice.finish_reason
                    )
                    yield chunk([done])
                    continue
                logprobs = None
                if request.logprobs is not None and entries:
                    logprobs = self._completion_logprobs(entries, offsets[choice.index])
                    offsets[choice.index] += sum(len(e.token) for e in entries)
                if text or logprobs:
                    yield chunk(
                        [CompletionChoice(index=choice.index, text=text, logprobs=logprobs)]
                    )
        if request.include_usage:
            yield chunk([], _usage(len(prepared.prompt_ids), choices))


def _log_generation(
    prepared: PreparedPrompt, choices: list[_Choice], metrics: GenerationMetrics, outcome: str
) -> None:
    ttft = metrics.time_to_first_token
    fields = {
        "outcome": outcome,
        "prompt_tokens": len(prepared.prompt_ids),
        "completion_tokens": metrics.completion_tokens,
        "finish_reasons": [c.finish_reason for c in choices],
        "closed_early": [c.closed for c in choices] if any(c.closed for c in choices) else None,
        "time_to_first_token_ms": None if ttft is None else round(ttft * 1000, 1),
        "duration_ms": round(metrics.elapsed * 1000, 1),
    }
    logger.info("generation %s", outcome, extra={"fields": fields})


def _cut(prepared: PreparedPrompt, choice: _Choice) -> int | None:
    """The budget a choice ran out of (``finish_reason`` length), else None."""
    return prepared.params.max_new_tokens if choice.finish_reason == "length" else None


def _finish(choice: _Choice, plan: ToolPlan | None, called: bool) -> ChoiceFinishReason:
    """``tool_calls`` when an answer that ended by itself holds calls; but ``stop`` for a
    call the request named, as OpenAI answers both."""
    if called and choice.finish_reason == "stop" and plan is not None and plan.mode != "named":
        return "tool_calls"
    return choice.finish_reason or "stop"


def _delta(event: Event) -> DeltaMessage:
    """A streamed piece of an answer with tools, as OpenAI sends it: a call's index, id,
    type and name first (arguments ""), then its arguments' text in pieces."""
    if isinstance(event, ContentDelta):
        return DeltaMessage(content=event.text)
    if isinstance(event, CallStart):
        call = DeltaToolCall(
            index=event.index,
            id=event.id,
            type="function",
            function=DeltaFunctionCall(name=event.name, arguments=""),
        )
    else:
        assert isinstance(event, ArgumentsDelta)
        call = DeltaToolCall(index=event.index, function=DeltaFunctionCall(arguments=event.text))
    return DeltaMessage(tool_calls=[call])


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]
