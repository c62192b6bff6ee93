"""The model's own chat template, rendered with jinja2 (as transformers does, without torch)."""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from logic.errors import InvalidRequestError


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A Hugging Face chat template: messages in, the prompt text the model was trained on out."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        self._special = {"bos_token": bos_token, "eos_token": eos_token}
        # Templates that take tools read a ``tools`` variable (and render ``tool_calls`` and
        # ``tool`` messages). Only those that ask for Hermes calls (``<tool_call>`` blocks:
        # Qwen2.5/3, Hermes, SmolLM3) are used so, as that is the form the answers are read
        # in; the others (and templates without tools) get the tool prompt (logic.tools).
        self.takes_tools = re.search(r"\btools\b", source) is not None and "<tool_call>" in source

    def render_parts(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[tuple[str, bool]] | None:
        """The prompt as ``(text, written by the template)`` pieces, in order: the template's
        own text, and each message's content as the template placed it (maybe trimmed).

        Rendered twice: with each content replaced by a unique placeholder, which shows
        where the template's text ends and a content begins, and as it is. None when the
        template transforms contents beyond trimming (the placeholders then do not come
        back once each, in order, or the contents cannot be found between them)."""
        nonce = secrets.token_hex(8)
        marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
        masked = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        skeleton = self.render(masked, add_generation_prompt=add_generation_prompt, tools=tools)
        text = self.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        pieces, rest, at = [], skeleton, 0
        for message, mark in zip(messages, marks, strict=True):
            if rest.count(mark) != 1:
                return None
            before, rest = rest.split(mark)
            if not text.startswith(before, at):
                return None
            pieces.append((before, True))
            at += len(before)
            content = str(message.get("content") or "")
            follows = rest.split(marks[marks.index(mark) + 1])[0] if mark != marks[-1] else rest
            for shown in (content, content.strip(), content.lstrip(), content.rstrip()):
                if text.startswith(shown, at) and text.startswith(follows, at + len(shown)):
                    break
            else:
                return None
            pieces.append((shown, False))
            at += len(shown)
        if text[at:] != rest:
            return None
        pieces.append((rest, True))
        return [(piece, trusted) for piece, trusted in pieces if piece]

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        extra = {"tools": tools} if tools else {}
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **self._special,
                **extra,
            )
        except TemplateError as exc:
            # Templates refuse conversations they cannot express (e.g. roles out of order).
            raise InvalidRequestError(
                f"The conversation does not fit the model's chat template: {exc}",
                param="messages",
                code="invalid_value",
            ) from exc
