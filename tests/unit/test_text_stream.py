"""Incremental detokenization, stop strings and cleanup: the streaming text path."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logic.cleanup import OutputCleaner
from logic.stops import StopStringMatcher
from logic.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, TextTokenizer

MULTIBYTE = "Grüße aus Köln: 日本語 ✓ 🙂 — fin"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_file(tiny_tokenizer_dir / "tokenizer.json")


def test_encode_decode_round_trip_keeps_special_markers_out_of_text(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nHello<|im_end|>")
    assert ids[0] == tokenizer.token_to_id("<|im_start|>")
    assert tokenizer.decode(ids) == "user\nHello"


def test_multibyte_characters_span_several_tokens_in_this_tokenizer(tokenizer):
    # The premise of the detokenizer tests below: some single characters are split.
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1
    assert tokenizer.decode(ids[:1]).endswith(REPLACEMENT_CHAR)


def test_detokenizer_never_emits_half_a_character_one_token_at_a_time(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([i]) for i in ids]
    deltas.append(detok.flush())
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "".join(deltas) == MULTIBYTE


def test_detokenizer_accepts_several_tokens_per_push(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.push(ids[i : i + 3]) for i in range(0, len(ids), 3)) + detok.flush()
    assert text == MULTIBYTE


def test_detokenizer_flush_gives_an_unfinished_character_as_is(tokenizer):
    first = tokenizer.encode("🙂")[:1]
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(first) == ""
    assert detok.flush() == REPLACEMENT_CHAR


def feed(matcher: StopStringMatcher, pieces: list[str]) -> list[str]:
    out = [matcher.push(p) for p in pieces]
    out.append(matcher.flush())
    return out


def test_stop_string_split_across_pieces_never_leaks():
    matcher = StopStringMatcher(["###"])
    out = feed(matcher, ["Hello #", "#", "# world"])
    assert out == ["Hello ", "", "", ""]
    assert matcher.stopped


def test_held_text_is_released_when_it_turns_out_not_to_be_a_stop():
    matcher = StopStringMatcher(["###"])
    out = feed(matcher, ["a #", "#b", " c#"])
    assert "".join(out) == "a ##b c#"
    assert out[1] == "##b"  # released as soon as it cannot be a stop
    assert not matcher.stopped


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["END", "\n\n"])
    assert matcher.push("one\n\ntwo END") == "one"
    assert matcher.push("more") == ""
    assert matcher.flush() == ""


def test_no_stop_strings_passes_text_through():
    matcher = StopStringMatcher([])
    assert matcher.push("abc") == "abc"
    assert matcher.flush() == ""


def test_overlapping_stop_prefixes_are_held_until_decided():
    matcher = StopStringMatcher(["abcd", "bcx"])
    assert matcher.push("zab") == "z"
    assert matcher.push("c") == ""
    assert matcher.push("x!") == "a"  # "bcx" matched
    assert matcher.stopped


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="ab#\n", min_size=1, max_size=5), max_size=3),
    pieces=st.lists(st.text(alphabet="ab#\nc", max_size=6), max_size=8),
)
def test_streamed_stops_give_what_the_whole_text_gives_and_hold_no_more_than_a_prefix(
    stops, pieces
):
    """Whatever the pieces: the text emitted is the whole text up to its earliest stop
    string, and what is held back after a piece is exactly the longest tail that could
    still begin a stop string."""
    matcher = StopStringMatcher(stops)
    seen = ""
    for piece in pieces:
        seen += piece
        matcher.push(piece)
        if not matcher.stopped:
            longest = max(
                (k for s in stops for k in range(1, len(s)) if seen.endswith(s[:k])), default=0
            )
            assert len(matcher._pending) == longest
    out = feed(StopStringMatcher(stops), pieces)
    hits = [i for i in (seen.find(s) for s in stops if s) if i >= 0]
    assert "".join(out) == (seen[: min(hits)] if hits else seen)


def test_cleaner_streamed_equals_whole_and_strips_outer_whitespace():
    pieces = ["\n ", " Hello", " ", "world", "  \n", "", "!", " \n\n"]
    streamed = OutputCleaner()
    joined = "".join(streamed.push(p) for p in pieces)
    assert joined == OutputCleaner().clean("".join(pieces)) == "Hello world  \n!"


def test_cleaner_holds_trailing_whitespace_until_text_follows():
    cleaner = OutputCleaner()
    assert cleaner.push("Hi ") == "Hi"
    assert cleaner.push(" ") == ""
    assert cleaner.push("there") == "  there"
