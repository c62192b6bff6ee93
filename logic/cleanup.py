"""Output cleanup that gives the same text whether an answer is streamed or not."""

from __future__ import annotations


class OutputCleaner:
    """Strips leading and trailing whitespace from generated text, streaming-safe.

    Trailing whitespace is held back until more text follows it, so the concatenated
    deltas of a stream equal the cleaned whole answer. Template markers that leak as plain
    text are handled earlier, as implicit stop strings (see ``logic.chat``).
    """

    def __init__(self) -> None:
        self._started = False
        self._held_whitespace = ""

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held_whitespace + text
        body = text.rstrip()
        self._held_whitespace = text[len(body) :]
        return body

    def clean(self, text: str) -> str:
        """Clean a whole answer at once."""
        return self.push(text)
