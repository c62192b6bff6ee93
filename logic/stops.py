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
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string.

        Only the places in the buffer's tail where a stop string's first character stands
        can start one: most pieces have none, and cost a ``find`` per stop string."""
        best, size = 0, len(buffer)
        for stop in self._stops:
            at = buffer.find(stop[0], max(0, size - len(stop) + 1))
            while at != -1 and size - at > best:
                if stop.startswith(buffer[at:]):
                    best = size - at  # the earliest start is this stop's longest
                    break
                at = buffer.find(stop[0], at + 1)
        return best
