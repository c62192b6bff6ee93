"""Constrained answers that end within their budget: closing a grammar before the tokens run out.

A grammar keeps every token of an answer valid, but it cannot make a small model finish: a
list whose items repeat, a string that never closes, run on until ``max_tokens`` cuts them, and
a cut JSON value is no value at all. :class:`Guard` watches a constrained answer's tokens as the
engine chooses them (inside the native engine's step, on its own matcher; over vLLM's stream,
on a matcher of its own: :meth:`Guard.close_chunk`) and ends the answer *validly* when it has
to:

* **the budget**: at each step it knows, from a fork of its own grammar matcher, a short way to
  end the grammar from here (:class:`ClosingSearch`: the closing quotes and brackets, the
  required fields still owed, the tool call's end tag, then the stop token). While the tokens
  left outnumber that way's length, the model's tokens go through untouched; when the model's
  next token would leave no room for one, that token is dropped and the way from before it is
  appended instead, and the answer ends with ``finish_reason`` "stop".
  What is closed early is valid for the grammar: required fields present, the schema's bounds
  kept (the way is found by the matcher itself, not written by hand);
* **loops**: a constrained answer whose last tokens repeat an earlier run of them (three copies
  of one period at least, ``LLM_STRUCTURED_LOOP_TOKENS`` tokens in all) is a small model stuck
  in a loop under greedy decoding (the same array item, the same call, a run inside a string).
  It is closed there, the same way, instead of burning the rest of its budget.

An answer that ends by itself is byte-identical with this on or off: nothing is changed before
the closing point, and none is reached by an answer that fits and does not repeat.

Why our own and not the grammar engine's: xgrammar (0.2.9) bounds a free-text region of a
structural tag in tokens (``any_text``'s ``max_tokens``), not a JSON value, and neither vLLM nor
llama.cpp closes a constrained answer at its budget (one Rust server, Atlas, does the same
kind of greedy close at the budget). The way to the end is found greedily (stop token, the
grammar's forced continuation, closing tokens, then the shortest values): not always the
shortest, always valid, and bounded by the tokens left. Measured in docs/structured.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from contract.tokens import GenerationChunk, TokenLogprob
from runners.bitmask import allocate_bitmask, allowed
from runners.settings import ClosingOptions

logger = logging.getLogger(__name__)

ClosedBy = Literal["budget", "loop"]
# Outside the last stretch the way's length is re-measured every CHECK_EVERY tokens; within
# twice the longest way seen (plus WINDOW) of the end, at every token.
CHECK_EVERY = 16
WINDOW = 16
MAX_PERIOD = 256  # longest repeating period looked for, in tokens


class ClosingSearch:
    """The way from a matcher's state to the grammar's end, in a tokenizer's tokens."""

    def __init__(self, decoded_vocab: list[bytes], never: list[int] | set[int]):
        self._vocab_size = len(decoded_vocab)
        never = set(never)
        index = {raw: i for i, raw in enumerate(decoded_vocab) if raw and i not in never}
        self._index, self._longest = index, max(map(len, index), default=1)
        # Tokens that only close (quotes and brackets), the longest first: most progress a step.
        closers = [i for raw, i in index.items() if set(raw) <= set(b'"]}')]
        closers.sort(key=lambda i: (-len(decoded_vocab[i]), i))
        # Then the shortest values, for required fields still owed and items still needed.
        # (a comma first: past a value, one that is still owed more fields or items)
        values = [b",", b"0", b'""', b'"', b"[]", b"{}", b"[", b"{", b"false", b"null", b"true"]
        values += [str(d).encode() for d in range(1, 10)] + [b"-", b"."]
        # Inside free text (a JSON string) every token but a quote adds to it: there, only
        # the closers that begin by ending it; elsewhere a quote opens a string, so only the
        # brackets. A letter the text takes tells where we are.
        self._in_text = [i for i in closers if decoded_vocab[i].startswith(b'"')]
        brackets = [i for i in closers if b'"' not in decoded_vocab[i]]
        self._candidates = brackets + [index[v] for v in values if v in index]
        self._probe = index.get(b"x")
        # When none of those fits (a key to choose, a pattern to follow): the shortest allowed
        # token that is not whitespace, letters and digits before punctuation.
        lengths = np.array([len(raw) or 1 << 20 for raw in decoded_vocab], dtype=np.int64)
        blank = np.array([raw.strip() == b"" for raw in decoded_vocab])
        other = np.array([not raw.isalnum() for raw in decoded_vocab])
        rank = lengths * 4 + other * 2 + blank * (1 << 12)
        self._order = np.argsort(rank, kind="stable")
        # Inside a string still owed characters (a minLength, a pattern), the longest allowed
        # plain token instead (a word before punctuation): the fewest tokens to what is owed.
        plain = np.array([b'"' not in raw and b"\\" not in raw for raw in decoded_vocab])
        text_rank = -lengths + other * (1 << 16) + blank * (1 << 20) + (~plain) * (1 << 22)
        self._text_order = np.argsort(text_rank, kind="stable")
        # ... tried first as candidates (an accept costs microseconds, a bitmask a tenth of a
        # millisecond): a string owed a long minLength is filled in a few cheap steps.
        words = [int(i) for i in self._text_order[:64] if decoded_vocab[i].isalnum()][:8]
        self._in_text = self._in_text + [i for i in words if i not in never]
        self._never = np.zeros(self._vocab_size, dtype=bool)
        self._never[list(i for i in never if i < self._vocab_size)] = True

    def way(self, matcher: Any, limit: int) -> list[int] | None:
        """Tokens that take ``matcher`` (changed: pass a fork) to the grammar's end, at most
        ``limit`` of them; None when no way that short was found."""
        path: list[int] = []
        stops = list(matcher.stop_token_ids)
        bitmask = None
        while not matcher.is_terminated():
            if len(path) >= limit:
                return None
            stop = next((s for s in stops if matcher.accept_token(s)), None)
            if stop is not None:
                path.append(stop)
                continue
            forced = self._tokens(matcher.find_jump_forward_string().encode())
            if forced:
                for token in forced[: limit - len(path)]:
                    if not matcher.accept_token(token):
                        return None
                    path.append(token)
                continue
            in_text = self._probe is not None and matcher.accept_token(self._probe)
            if in_text:
                matcher.rollback(1)
            for token in self._in_text if in_text else self._candidates:
                if matcher.accept_token(token):
                    path.append(token)
                    break
            else:
                if bitmask is None:
                    bitmask = allocate_bitmask(1, self._vocab_size)
                matcher.fill_next_token_bitmask(bitmask)
                ok = allowed(bitmask[0], self._vocab_size) & ~self._never
                order = self._text_order if in_text else self._order
                ranked = order[ok[order]]
                if not len(ranked) or not matcher.accept_token(int(ranked[0])):
                    return None
                path.append(int(ranked[0]))
        return path

    def _tokens(self, text: bytes) -> list[int]:
        """``text`` in the vocabulary's tokens, longest match first (xgrammar 0.2.8, which
        vLLM's CPU build pins, has no find_jump_forward_tokens); as far as it goes."""
        out, at = [], 0
        while at < len(text):
            for size in range(min(self._longest, len(text) - at), 0, -1):
                token = self._index.get(text[at : at + size])
                if token is not None:
                    out.append(token)
                    at += size
                    break
            else:
                break
        return out


class Repeats:
    """Whether the tokens seen end in a loop: the last ``min_tokens`` or more of them periodic,
    with at least three whole copies of the period (of at most :data:`MAX_PERIOD` tokens).

    Three, not two: a list that ends with one item written twice is an answer (measured: two
    such on vLLM's sampled answers, which ended by themselves right after); a third copy is a
    model that does not stop."""

    def __init__(self, min_tokens: int, max_period: int = MAX_PERIOD):
        self.min_tokens = min_tokens
        self._recent = np.full(max_period, -1, dtype=np.int64)  # [0]: the latest token
        # _runs[p - 1]: how many tokens in a row equal the token p before them.
        self._runs = np.zeros(max_period, dtype=np.int64)
        self._periods = np.arange(1, max_period + 1)

    def push(self, token: int) -> bool:
        same = self._recent == token
        self._runs = np.where(same, self._runs + 1, 0)
        self._recent = np.roll(self._recent, 1)
        self._recent[0] = token
        runs, periods = self._runs, self._periods
        return bool(np.any((runs >= 2 * periods) & (runs + periods >= self.min_tokens)))


@dataclass(frozen=True)
class Verdict:
    """What :meth:`Guard.step` made of a token."""

    accepted: bool = True  # by the grammar (False: the answer left it; the engine's to handle)
    keep: bool = True  # the token stays in the answer
    way: list[int] | None = None  # when the answer must end now: the tokens that close it
    why: ClosedBy | None = None


_GO_ON = Verdict()


class Guard:
    """One constrained answer's watch (see the module's docstring). :meth:`step` takes each
    token the engine chose, in order, into ``matcher`` (the engine's own, or one of its own
    beside an engine whose matcher it cannot reach), and says when to close."""

    def __init__(
        self,
        matcher: Any,
        search: ClosingSearch,
        *,
        budget: int,
        options: ClosingOptions,
    ):
        self._matcher = matcher
        self._search = search
        self._budget = budget
        self._close = options.close
        self._repeats = Repeats(options.loop_tokens) if options.loop_tokens > 0 else None
        self._produced = 0
        # The longest way measured in this answer: entering an object owed required fields
        # lengthens the way at once by as much, so within twice it of the end every token is
        # measured (and a token that leaves no room is taken back).
        self._need = 0
        self._checked_at = -CHECK_EVERY  # measured at the first token
        self._way: list[int] | None = None  # from the state before the last token, if measured
        self._ended = False
        # No way fitted at the last look and none was kept: looked at again after a pause that
        # doubles with each miss (a long minLength can stay out of reach for good).
        self._stuck = False
        self._pause = CHECK_EVERY

    def step(self, token: int) -> Verdict:
        if self._ended:
            return _GO_ON
        matcher = self._matcher
        if not matcher.accept_token(token):
            self._ended = True
            return Verdict(accepted=False)
        self._produced += 1
        left = self._budget - self._produced
        if matcher.is_terminated():  # the model ended it
            self._ended = True
            return _GO_ON
        if self._repeats is not None and self._repeats.push(token):
            way = self._find(limit=max(left, 0))
            if self._ended:
                return _GO_ON
            if way is not None:
                self._ended = True
                return Verdict(way=way, why="loop")
        if not self._close:
            return _GO_ON
        since = self._produced - self._checked_at
        if self._stuck:
            due = since >= self._pause
        else:
            due = since >= CHECK_EVERY or left <= 2 * self._need + WINDOW
        if not due:
            self._way = None
            return _GO_ON
        way = self._find(limit=left)
        if self._ended:
            return _GO_ON
        self._checked_at = self._produced
        if way is None:
            previous, self._way = self._way, None
            if previous is None:
                # No way fits the tokens left (a long minLength, or the way grew past them
                # between checks): the answer will be cut as without the guard, unless the
                # model closes things itself; looked at again after a pause, each search
                # bounded by the tokens left.
                if self._stuck:
                    self._pause *= 2
                self._stuck = True
                return _GO_ON
            matcher.rollback(1)  # this token leaves no room to close: the way from before it
            self._ended = True
            return Verdict(keep=False, way=previous, why="budget")
        # Kept for the next token: when that one leaves no room, it is taken back and this way
        # closes instead. (Not closed at once when the way just fits: the model may end it.)
        self._need = max(self._need, len(way))
        self._way, self._stuck, self._pause = way, False, CHECK_EVERY
        return _GO_ON

    def _find(self, *, limit: int) -> list[int] | None:
        try:
            return self._search.way(self._matcher.fork(), limit=limit)
        except Exception:  # noqa: BLE001 - the guard only helps: it never fails an answer
            logger.exception("structured output: the closing search failed; the guard is off")
            self._ended = True
            return None

    def close_chunk(self, chunk: GenerationChunk, *, logprobs: bool) -> GenerationChunk | None:
        """For an engine's stream, one chunk at a time: None to pass ``chunk`` on, or the
        answer's last chunk (what was kept, the closing tokens, "stop"), after which the
        engine's request is ended. A token the grammar refuses (the engine's grammar is not
        this one) makes the guard stand aside for the rest of the answer. Closing tokens carry
        log-probability 0: each is the only token the closing allows."""
        if self._ended or chunk.finish_reason == "stop":
            return None
        for k, token in enumerate(chunk.token_ids):
            verdict = self.step(token)
            if not verdict.accepted:
                logger.warning(
                    "structured output: the closing guard is out of step at token %d (%d of "
                    "the answer); off", token, self._produced + 1,
                )  # fmt: skip
                return None
            if verdict.way is None:
                continue
            kept = k + 1 if verdict.keep else k
            entries = None
            if logprobs:
                entries = list((chunk.logprobs or [])[:kept])
                entries += [TokenLogprob(token_id=t, logprob=0.0) for t in verdict.way]
            return GenerationChunk(
                token_ids=chunk.token_ids[:kept] + verdict.way,
                finish_reason="stop",
                logprobs=entries,
                cached_tokens=chunk.cached_tokens,
                closed=verdict.why,
            )
        return None
