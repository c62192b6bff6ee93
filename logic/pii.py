"""Masking of personal data in text: e-mail addresses, phone numbers and payment cards.

Each kind is found by a precompiled, linear-time pattern (every repetition is either
unambiguous or anchored by a look-behind that only lets a match start at the beginning of a
run), then judged by a small pure function. A candidate the judge refuses is left as it is.

Kinds are masked in this order: e-mail addresses (they may hold digits), payment cards
(13 to 19 digits passing the Luhn check), then phone numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable

KINDS = ("email", "phone", "card")
DEFAULT_MASK = "[{kind}]"  # {kind} is the upper-case kind: [EMAIL], [PHONE], [CARD]

# ---------------------------------------------------------------- e-mail addresses

# A match starts only where a run of local-part characters starts, so a long run without
# an "@" is scanned once, not once per position.
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])"
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)

# ---------------------------------------------------------------- payment cards

# Maximal runs of digit groups joined by single spaces or dashes. The run is judged in
# Python (see _card_spans), so the pattern itself never backtracks across groups.
_DIGIT_RUN = re.compile(r"(?<![\w])(?<!\d[ -])\d+(?:[ -]\d+)*")
_CARD_DIGITS = range(13, 20)
_MIN_CARD_GROUP = 3  # printed groupings: 4-4-4-4, 4-6-5, 4-4-4-4-3

# ---------------------------------------------------------------- phone numbers

# An optional "+", an optional "(area) ", then digit groups joined by one space, dot or
# dash, or by a parenthesised group such as the trunk "(0)". Digit groups must be joined by
# a separator, so a run of digits splits into groups in exactly one way. A match may not
# start or end inside a word, a larger number, a decimal, a time or a date ("12:30",
# "3.5", "15/01").
_PHONE = re.compile(
    r"(?<![\w+])(?<!\d[.,:/-])"
    r"\+?(?:\(\d{1,5}\)[ .-]?)?\d{1,15}"
    r"(?:[ .-]\d{1,15}|[ .-]?\(\d{1,5}\)[ .-]?\d{1,15})*"
    r"(?!\w)(?![.,:/-]?\d)"
)
_GROUPS = re.compile(r"\d+")
_NOT_SEPARATOR = re.compile(r"[\d()]")
_INTERNATIONAL_DIGITS = range(8, 16)  # E.164 allows at most 15
_NATIONAL_DIGITS = range(10, 12)  # e.g. (415) 555-2671, 020 7946 0958, 01 23 45 67 89


def redact(text: str, *, mask: str = DEFAULT_MASK) -> tuple[str, dict[str, int]]:
    """``text`` with e-mail addresses, phone numbers and payment cards masked.

    ``mask`` is a format string; ``{kind}`` becomes ``EMAIL``, ``PHONE`` or ``CARD``.
    Returns the masked text and the number of masks of each kind (every kind, maybe 0).
    """
    counts = dict.fromkeys(KINDS, 0)

    def masker(kind: str) -> str:
        counts[kind] += 1
        return mask.format(kind=kind.upper())

    text = _EMAIL.sub(lambda m: masker("email"), text)
    text = _DIGIT_RUN.sub(lambda m: _mask_cards(m, lambda: masker("card")), text)
    text = _PHONE.sub(lambda m: masker("phone") if is_phone(m.group()) else m.group(), text)
    return text, counts


# ---------------------------------------------------------------- judges


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check that payment card numbers pass."""
    if not digits.isdigit():
        return False
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = int(char)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def is_phone(candidate: str) -> bool:
    """Whether a candidate of the phone pattern looks like a phone number.

    International (``+`` country code): 8 to 15 digits, in groups or (from 10 digits) not.
    National: 10 or 11 digits in at least three groups, or in two groups when the first is
    a parenthesised area code or starts with the trunk prefix 0 ("030 12345678"). Dates,
    IP addresses, decimals and numbers grouped by thousands are refused.
    """
    groups = _GROUPS.findall(candidate)
    digits = sum(len(g) for g in groups)
    if _looks_like_date(groups):
        return False
    if candidate.startswith("+"):
        return digits in _INTERNATIONAL_DIGITS and (len(groups) > 1 or digits >= 10)
    if digits not in _NATIONAL_DIGITS or len(groups) < 2:
        return False
    separators = set(_NOT_SEPARATOR.sub("", candidate))
    if separators == {"."} and (len(groups) == 2 or _looks_like_ip(groups)):
        return False
    if len(groups) >= 3 and len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:]):
        return False  # 1 234 567 890: an amount grouped by thousands
    # Two groups: 10000-20000 is a range more often than a phone number.
    return len(groups) > 2 or candidate.startswith("(") or groups[0].startswith("0")


def _looks_like_date(groups: list[str]) -> bool:
    shape = tuple(len(g) for g in groups)
    return shape in {(4, 2, 2), (2, 2, 4), (4, 1, 1), (1, 1, 4)}


def _looks_like_ip(groups: list[str]) -> bool:
    return len(groups) == 4 and all(len(g) <= 3 for g in groups)


def _mask_cards(match: re.Match[str], masker: Callable[[], str]) -> str:
    """A digit run with each card number in it masked."""
    run = match.group()
    end = match.end()
    if end < len(match.string) and (match.string[end].isalnum() or match.string[end] == "_"):
        return run  # the run goes on into a word, as in 4111111111111111abc
    spans = _card_spans(run)
    if not spans:
        return run
    out, last = [], 0
    for start, stop in spans:
        out += [run[last:start], masker()]
        last = stop
    out.append(run[last:])
    return "".join(out)


def _card_spans(run: str) -> list[tuple[int, int]]:
    """Character spans of the card numbers in a run of digit groups, left to right.

    A card is a window of whole groups of at least three digits (so "01 23 45 67 89 ..." is
    never one) holding 13 to 19 digits that pass the Luhn check. Longer windows win over
    shorter ones that overlap them and pass by chance. A window holds at most 19 digits, so
    the work is linear in the run's length.
    """
    groups = [(m.start(), m.end()) for m in _GROUPS.finditer(run)]
    windows = []  # (digits, first group, last group)
    for i in range(len(groups)):
        digits = ""
        for j in range(i, len(groups)):
            start, stop = groups[j]
            if stop - start < _MIN_CARD_GROUP or len(digits) + stop - start > _CARD_DIGITS[-1]:
                break
            digits += run[start:stop]
            if len(digits) in _CARD_DIGITS and luhn_valid(digits):
                windows.append((len(digits), i, j))
    taken = [False] * len(groups)
    chosen = []
    for _, i, j in sorted(windows, key=lambda w: (-w[0], w[1])):
        if not any(taken[i : j + 1]):
            taken[i : j + 1] = [True] * (j + 1 - i)
            chosen.append((groups[i][0], groups[j][1]))
    return sorted(chosen)
