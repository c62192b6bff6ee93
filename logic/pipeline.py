"""Business-logic pipeline: ordered, settings-chosen steps around the model.

    request messages -> pre-steps (Conversation -> Conversation) -> chat template ...
    ... model -> answer text -> post-steps (str -> str) -> response

Each step is a small pure function, made by a *factory* that takes the settings (any object;
attributes are read with defaults, so a ``SimpleNamespace`` does) and registered under a
name. A user adds a step in their own module, without touching this one::

    from logic.pipeline import Conversation, register_pre_step

    @register_pre_step("shout")
    def shout(settings):
        def step(conversation: Conversation) -> Conversation:
            ...
        return step

then names the module in ``settings.step_modules`` and the step in ``settings.pre_steps``
(or passes the names to :meth:`Pipeline.from_settings`).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from logic import pii
from logic.errors import InvalidRequestError
from logic.settings import APISettings

# ---------------------------------------------------------------- conversation and steps


@dataclass(frozen=True)
class Conversation:
    """What the pre-steps work on: template-ready messages and notes about them.

    ``messages`` are ``{"role": ..., "content": <str>}``; ``notes`` carries metadata from
    step to step and out to the caller (e.g. ``notes["pii"]``, the redaction counts). Steps
    return a new conversation rather than change the one they are given.
    """

    messages: list[dict[str, str]]
    notes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_messages(cls, messages: Iterable[Any]) -> Conversation:
        """From request messages: :class:`logic.protocol.ChatMessage` s (their ``.text``) or
        dicts whose content is a string or a list of ``{"type": "text", "text": ...}``."""
        return cls(messages=[_plain_message(m) for m in messages])

    def replace(self, **changes: Any) -> Conversation:
        """A copy with some fields replaced: ``conversation.replace(messages=[...])``."""
        return dataclasses.replace(self, **changes)


def _plain_message(message: Any) -> dict[str, str]:
    if not isinstance(message, dict):
        return {"role": message.role, "content": message.text}
    content = message.get("content") or ""
    if not isinstance(content, str):
        content = "".join(part["text"] for part in content)
    return {**message, "content": content}  # other keys (a template's tool_calls) kept


PreStep = Callable[[Conversation], Conversation]
PostStep = Callable[[str], str]
AnswerStep = Callable[[str], None]
PreStepFactory = Callable[[Any], PreStep]
PostStepFactory = Callable[[Any], PostStep]
AnswerStepFactory = Callable[[Any], AnswerStep]
Factory = TypeVar("Factory", bound=Callable[[Any], Callable[..., Any]])

# ---------------------------------------------------------------- registry

PRE_STEPS: dict[str, PreStepFactory] = {}
POST_STEPS: dict[str, PostStepFactory] = {}
ANSWER_STEPS: dict[str, AnswerStepFactory] = {}


def register_pre_step(name: str, *, replace: bool = False) -> Callable[[Factory], Factory]:
    """Registers a pre-step factory under ``name``; ``replace`` allows overriding one."""
    return _registrar(PRE_STEPS, "pre-step", name, replace)


def register_post_step(name: str, *, replace: bool = False) -> Callable[[Factory], Factory]:
    """Registers a post-step factory under ``name``; ``replace`` allows overriding one."""
    return _registrar(POST_STEPS, "post-step", name, replace)


def register_answer_step(name: str, *, replace: bool = False) -> Callable[[Factory], Factory]:
    """Registers an answer-step factory under ``name``: its step sees each whole answer's
    text once it is complete, streamed or not (a check, an audit record), and may raise an
    :class:`~logic.errors.APIError` (a streamed answer then ends with an error event)."""
    return _registrar(ANSWER_STEPS, "answer step", name, replace)


def _registrar(
    registry: dict[str, Any], kind: str, name: str, replace: bool
) -> Callable[[Factory], Factory]:
    def register(factory: Factory) -> Factory:
        if name in registry and registry[name] is not factory and not replace:
            raise ValueError(f"A {kind} named {name!r} is already registered.")
        registry[name] = factory
        return factory

    return register


# ---------------------------------------------------------------- built-in pre-steps

# Set by ``system_prompt`` when it inserts the default system prompt as the first message:
# steps that report message indices use it to keep the client's numbering.
ADDED_SYSTEM_PROMPT = "added_system_prompt"

# "developer" is OpenAI's newer name for the system role; chat templates know "system".
_ROLE_ALIASES = {"developer": "system"}


def add_system_prompt(conversation: Conversation, prompt: str | None) -> Conversation:
    """``developer`` messages become ``system`` ones, and ``prompt`` comes first when the
    conversation has no system message."""
    messages = [
        {**m, "role": _ROLE_ALIASES.get(m["role"], m["role"])} for m in conversation.messages
    ]
    if not prompt or any(m["role"] == "system" for m in messages):
        return conversation.replace(messages=messages)
    return conversation.replace(
        messages=[{"role": "system", "content": prompt}, *messages],
        notes={**conversation.notes, ADDED_SYSTEM_PROMPT: True},
    )


@register_pre_step("system_prompt")
def system_prompt(settings: Any) -> PreStep:
    """Factory: the default system prompt is ``settings.system_prompt`` (none when empty)."""
    prompt = getattr(settings, "system_prompt", None) or None
    return lambda conversation: add_system_prompt(conversation, prompt)


# The built-in steps' defaults are the API settings' own (stated once, in logic/settings.py),
# for a settings object (any object: tests, your own) that lacks the attribute.
_DEFAULTS = APISettings.model_construct()


def check_input_limits(
    conversation: Conversation,
    *,
    max_messages: int | None,
    max_message_chars: int | None,
    max_input_chars: int | None,
) -> Conversation:
    """The conversation, unchanged, if the client's messages are within the limits (None:
    no limit); else an :class:`InvalidRequestError` naming the offending parameter.

    A default system prompt added by ``system_prompt`` is the operator's, so it is not
    counted, and indices in ``param`` are those of the request.
    """
    first = 1 if conversation.notes.get(ADDED_SYSTEM_PROMPT) else 0
    messages = conversation.messages[first:]
    if max_messages is not None and len(messages) > max_messages:
        raise InvalidRequestError(
            f"Too many messages: {len(messages)}. At most {max_messages} are allowed.",
            param="messages",
            code="too_many_messages",
        )
    total = 0
    for i, message in enumerate(messages):
        size = len(message["content"])
        if max_message_chars is not None and size > max_message_chars:
            raise InvalidRequestError(
                f"Message {i} is {size} characters long. At most {max_message_chars} are "
                "allowed in one message.",
                param=f"messages[{i}].content",
                code="input_too_long",
            )
        total += size
    if max_input_chars is not None and total > max_input_chars:
        raise InvalidRequestError(
            f"The messages are {total} characters long. At most {max_input_chars} are "
            "allowed in all.",
            param="messages",
            code="input_too_long",
        )
    return conversation


@register_pre_step("input_limits")
def input_limits(settings: Any) -> PreStep:
    """Factory: ``settings.max_messages``, ``max_message_chars`` and ``max_input_chars``;
    a missing attribute takes the default, one set to None means no limit."""
    limits = {
        name: getattr(settings, name, getattr(_DEFAULTS, name))
        for name in ("max_messages", "max_message_chars", "max_input_chars")
    }
    return lambda conversation: check_input_limits(conversation, **limits)


PII_NOTE = "pii"
REDACTED_ROLES = frozenset({"system", "developer", "user", "tool"})


def redact_conversation(
    conversation: Conversation, *, mask: str = pii.DEFAULT_MASK
) -> Conversation:
    """System and user messages with personal data masked (see :func:`logic.pii.redact`);
    ``notes["pii"]`` adds up the masks of each kind."""
    counts = dict.fromkeys(pii.KINDS, 0) | conversation.notes.get(PII_NOTE, {})
    messages = []
    for message in conversation.messages:
        if message["role"] in REDACTED_ROLES:
            content, found = pii.redact(message["content"], mask=mask)
            message = {**message, "content": content}
            counts = {kind: counts[kind] + found[kind] for kind in counts}
        messages.append(message)
    return conversation.replace(messages=messages, notes={**conversation.notes, PII_NOTE: counts})


@register_pre_step("redact_pii")
def redact_pii(settings: Any) -> PreStep:
    """Factory: ``settings.pii_mask`` is the mask format (``LLM_PII_MASK``)."""
    mask = getattr(settings, "pii_mask", None) or _DEFAULTS.pii_mask
    return lambda conversation: redact_conversation(conversation, mask=mask)


# ---------------------------------------------------------------- built-in post-steps

# A leaked end-of-turn marker ends the answer: what follows is a made-up next turn. Other
# markers are removed. (``logic.chat`` already stops at the model's own markers; these
# catch the common families whatever the model.)
END_OF_TURN_MARKERS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_turn>",
)
OTHER_MARKERS = (
    "<|im_start|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|begin_of_text|>",
    "<start_of_turn>",
)
_END_OF_TURN = re.compile("|".join(map(re.escape, END_OF_TURN_MARKERS)))
_OTHER_MARKER = re.compile("|".join(map(re.escape, OTHER_MARKERS)))
_TURN_HEADER = re.compile(r"\A\s*assistant[ \t]*(?:\r?\n)+")


def strip_artefacts(text: str) -> str:
    """``text`` cut at the first end-of-turn marker, without other template markers or a
    leading ``assistant`` line left by a leaked turn header."""
    end = _END_OF_TURN.search(text)
    if end:
        text = text[: end.start()]
    return _TURN_HEADER.sub("", _OTHER_MARKER.sub("", text), count=1)


@register_post_step("strip_template_artefacts")
def strip_template_artefacts(settings: Any) -> PostStep:
    """Factory for :func:`strip_artefacts` (no settings)."""
    return strip_artefacts


@register_post_step("strip_trailing_whitespace")
def strip_trailing_whitespace(settings: Any) -> PostStep:
    """Factory: whitespace at the end of the answer is removed (no settings)."""
    return str.rstrip


# ---------------------------------------------------------------- pipeline

DEFAULT_PRE_STEPS = ("system_prompt",)
DEFAULT_POST_STEPS: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pipeline:
    """Named pre-steps and post-steps, applied in order."""

    pre: tuple[tuple[str, PreStep], ...] = ()
    post: tuple[tuple[str, PostStep], ...] = ()
    answer: tuple[tuple[str, AnswerStep], ...] = ()

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        pre: Sequence[str] | str | None = None,
        post: Sequence[str] | str | None = None,
        answer: Sequence[str] | str | None = None,
    ) -> Pipeline:
        """The steps named in ``pre`` and ``post``, built from ``settings``.

        Names default to ``settings.pre_steps`` / ``settings.post_steps`` (a list, or a
        comma-separated string), then to :data:`DEFAULT_PRE_STEPS` / :data:`DEFAULT_POST_STEPS`.
        The modules in ``settings.step_modules`` are imported first, so that the steps they
        register can be named. An unknown name raises ValueError listing the known ones.
        """
        for module in _names(getattr(settings, "step_modules", None), ()):
            importlib.import_module(module)
        pre = _names(pre, getattr(settings, "pre_steps", None), DEFAULT_PRE_STEPS)
        post = _names(post, getattr(settings, "post_steps", None), DEFAULT_POST_STEPS)
        answer = _names(answer, getattr(settings, "answer_steps", None), ())
        return cls(
            pre=_build(PRE_STEPS, "pre-step", pre, settings),
            post=_build(POST_STEPS, "post-step", post, settings),
            answer=_build(ANSWER_STEPS, "answer step", answer, settings),
        )

    @property
    def pre_names(self) -> list[str]:
        return [name for name, _ in self.pre]

    @property
    def post_names(self) -> list[str]:
        return [name for name, _ in self.post]

    def before(self, conversation: Conversation) -> Conversation:
        """The pre-steps, in order; a step may raise an :class:`~logic.errors.APIError`."""
        for name, step in self.pre:
            conversation = step(conversation)
            if not isinstance(conversation, Conversation):
                raise TypeError(f"Pre-step {name!r} returned {type(conversation).__name__}.")
        return conversation

    def check(self, text: str) -> None:
        """The answer steps, in order, on a complete answer's text (streamed or not)."""
        for _, step in self.answer:
            step(text)

    def after(self, text: str) -> str:
        """The post-steps, in order, on the final answer text."""
        for name, step in self.post:
            text = step(text)
            if not isinstance(text, str):
                raise TypeError(f"Post-step {name!r} returned {type(text).__name__}.")
        return text


def _names(*choices: Sequence[str] | str | None) -> list[str]:
    """The first choice that is not None, as step names: a list, or a comma-separated string."""
    value = next(choice for choice in choices if choice is not None)
    items = value.split(",") if isinstance(value, str) else value
    return [name.strip() for name in items if name.strip()]


def _build(
    registry: dict[str, Callable[[Any], Any]], kind: str, names: Iterable[str], settings: Any
) -> tuple[tuple[str, Any], ...]:
    steps = []
    for name in names:
        if name not in registry:
            known = ", ".join(sorted(registry)) or "none"
            raise ValueError(f"Unknown {kind} {name!r}. Known {kind}s: {known}.")
        steps.append((name, registry[name](settings)))
    return tuple(steps)
