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
