"""What the API side reads from a model directory: tokenizer, chat template, limits.

The files are the standard Hugging Face ones that the import step writes into the model
store (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``,
``config.json``, ``generation_config.json``), so any imported model works the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logic.template import ChatTemplate
from logic.tokenizer import TextTokenizer


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_text(value: Any) -> str:
    # tokenizer_config.json stores special tokens as strings or as {"content": ...}.
    if isinstance(value, dict):
        return value.get("content", "")
    return value or ""


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


@dataclass(frozen=True)
class ModelFiles:
    """A loaded model directory, as the business logic needs it."""

    tokenizer: TextTokenizer
    template: ChatTemplate
    context_length: int
    eos_token_ids: list[int]
    template_markers: list[str]

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS, and the template's turn markers: a model that opens a new turn is done."""
        ids = list(self.eos_token_ids)
        for marker in self.template_markers:
            token_id = self.tokenizer.token_to_id(marker)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    def encode_conversation(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The prompt's token ids, in which only the chat template writes special tokens.

        Text from users and tools that spells a special token ("<|im_end|>\n<|im_start|>system")
        would otherwise be read as one and open a turn of its own, a system turn included. Such
        contents are tokenized as plain text, between the template's own pieces
        (:meth:`ChatTemplate.render_parts`). A template that rewrites contents beyond trimming
        cannot be cut so; there the special-token text in contents is broken by a word joiner
        (U+2060) before rendering. Conversations without such text are tokenized whole, exactly
        as before. Earlier tool calls (``tool_calls``, for a template that takes tools) and the
        tools' own descriptions are text from clients too: theirs is broken the same way."""
        tokenizer, template = self.tokenizer, self.template
        specials = [s for s in tokenizer.special_tokens if s]
        # Whatever else a message carries (a template's tool_calls, a tool_call_id) and the tools.
        messages = [{k: v if k in ("role", "content") else _defuse(v, specials)
                     for k, v in m.items()} for m in messages]  # fmt: skip
        tools = _defuse(tools, specials)
        if not any(s in str(m.get("content") or "") for m in messages for s in specials):
            return tokenizer.encode(template.render(messages, tools=tools))
        parts = template.render_parts(messages, tools=tools)
        if parts is None:
            defused = [{**m, "content": _defuse(str(m.get("content") or ""), specials)}
                       for m in messages]  # fmt: skip
            return tokenizer.encode(template.render(defused, tools=tools))
        ids: list[int] = []
        for text, by_template in parts:
            ids += tokenizer.encode(text) if by_template else tokenizer.encode_plain(text)
        return ids

    @classmethod
    def load(cls, path: str | Path) -> ModelFiles:
        path = Path(path)
        tokenizer = TextTokenizer.from_file(path / "tokenizer.json")
        tok_config = _read_json(path / "tokenizer_config.json")
        config = _read_json(path / "config.json")
        gen_config = _read_json(path / "generation_config.json")

        template_file = path / "chat_template.jinja"
        source = (
            template_file.read_text() if template_file.exists() else tok_config.get("chat_template")
        )
        if not source:
            raise ValueError(f"{path} has no chat template")
        bos = _token_text(tok_config.get("bos_token"))
        eos = _token_text(tok_config.get("eos_token"))

        eos_ids = _as_list(gen_config.get("eos_token_id")) or _as_list(config.get("eos_token_id"))
        if eos and (eos_id := tokenizer.token_to_id(eos)) is not None and eos_id not in eos_ids:
            eos_ids.append(eos_id)
        if not eos_ids:
            raise ValueError(f"{path} names no end-of-sequence token")

        return cls(
            tokenizer=tokenizer,
            template=ChatTemplate(source, bos_token=bos, eos_token=eos),
            context_length=int(config.get("max_position_embeddings", 2048)),
            eos_token_ids=eos_ids,
            # Special tokens the template writes (turn markers): never part of an answer.
            template_markers=[t for t in tokenizer.special_tokens if t in source],
        )


def _defuse(value: Any, specials: list[str]) -> Any:
    """``value`` (text, or JSON-like data holding text) with special-token text broken."""
    if isinstance(value, list):
        return [_defuse(item, specials) for item in value]
    if isinstance(value, dict):
        return {_defuse(k, specials): _defuse(v, specials) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    for special in specials:
        value = value.replace(special, special[0] + "\u2060" + special[1:])
    return value
