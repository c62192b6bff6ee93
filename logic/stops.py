"""Stop strings over streamed text, without ever leaking part of a match."""

from __future__ import annotations


class StopStringMatcher:
    """Finds the first stop string in text that arrives in pieces.

    Text that could still be the start of a stop string is held back until the next piece
    decides it, so a client never sees ``"###"`` become ``"##"`` plus a retraction.
    """

    def __init__(self, stop_strings: list[str]):
        self._stops = [s for s in stop_strings if s]
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what is safe to emit. After a match, :attr:`stopped` is True."""
        if self.stopped:
            return ""
        buffer = self._pending + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return buffer[: min(hits)]
        hold = self._longest_partial_match(buffer)
        self._pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """At the end of the stream, held-back text was not a stop string after all."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text

    def _longest_partial_match(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:size]):
                    best = size
                    break
        return best
