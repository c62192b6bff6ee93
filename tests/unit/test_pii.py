"""Masking of e-mail addresses, phone numbers and payment cards."""

from __future__ import annotations

import time

import pytest

from logic.pii import luhn_valid, redact

VISA = "4111111111111111"  # a well-known test number that passes the Luhn check


def masked(text: str) -> str:
    return redact(text)[0]


# ---------------------------------------------------------------- e-mail addresses


@pytest.mark.parametrize(
    "address",
    ["john@example.com", "john.doe+tag@mail.example.co.uk", "a_b%c-d@sub-domain.example.io"],
)
def test_email_addresses_are_masked(address: str):
    text, counts = redact(f"Write to {address}, please.")
    assert text == "Write to [EMAIL], please."
    assert counts == {"email": 1, "phone": 0, "card": 0}


@pytest.mark.parametrize("text", ["@handle", "a@b", "user@localhost", "x @ y.com", "me@x.c"])
def test_things_that_are_not_email_addresses_are_kept(text: str):
    assert masked(text) == text


# ---------------------------------------------------------------- phone numbers


@pytest.mark.parametrize(
    "number",
    [
        "+1 415 555 2671",
        "+1-415-555-2671",
        "+1 (415) 555-2671",
        "+14155552671",
        "+44 20 7946 0958",
        "+44 (0)20 7946 0958",
        "+33 1 23 45 67 89",
        "+49 (0)30 123456",
        "+49.30.12345678",
        "(415) 555-2671",
        "(415)555-2671",
        "415-555-2671",
        "415.555.2671",
        "415 555 2671",
        "1-800-555-0199",
        "020 7946 0958",
        "01 23 45 67 89",
        "06-12-34-56-78",
        "030 12345678",
        "07700 900123",
    ],
)
def test_phone_numbers_are_masked(number: str):
    text, counts = redact(f"Call {number} today.")
    assert text == "Call [PHONE] today."
    assert counts["phone"] == 1


@pytest.mark.parametrize(
    "text",
    [
        "I have 42 apples and 7 pears.",
        "Born in 1987, retired in 2024.",
        "It costs $1,299.99 or €15.50.",
        "An amount of 1 234 567 890 euros.",
        "Meet at 12:30 or 18:45:10.",
        "On 2024-01-15, 15/01/2024, 15.01.2024 or 2024-01-15 12:30.",
        "Between 10000-20000 units.",
        "Pi is 3.1415926535.",
        "Ping 192.168.100.100 or 192.168.1.100.",
        "Version 1.2.3.4 of the code.",
        "Timestamp 1700000000 in seconds.",
        "Order 4155552671 shipped.",
        "Order #A4155552671 shipped.",
        "It rose +12.5% to +3000.",
        "ISBN 978-3-16-148410-0 is a book.",
    ],
)
def test_numbers_that_are_not_phone_numbers_are_kept(text: str):
    assert masked(text) == text


# ---------------------------------------------------------------- payment cards


def test_luhn_check():
    assert luhn_valid(VISA)
    assert luhn_valid("378282246310005")  # American Express test number
    assert luhn_valid("79927398713")  # the textbook example
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("79927398710")
    assert not luhn_valid("4111-1111")


@pytest.mark.parametrize(
    "card",
    [
        VISA,
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "3782 822463 10005",  # American Express grouping, 15 digits
        "5555555555554444",
        "6011 1111 1111 1117",
        "4000 0000 0000 0000 006",  # 19 digits
    ],
)
def test_card_numbers_that_pass_the_luhn_check_are_masked(card: str):
    text, counts = redact(f"Card: {card}.")
    assert text == "Card: [CARD]."
    assert counts == {"email": 0, "phone": 0, "card": 1}


@pytest.mark.parametrize(
    "text",
    [
        "Card: 4111 1111 1111 1112.",  # fails the Luhn check
        "Id 41111111111111111111111 is longer than any card.",
        "Code 4111111111111111abc is part of a word.",
        "Short 411111111111.",  # 12 digits
    ],
)
def test_numbers_that_are_not_cards_are_kept(text: str):
    assert masked(text) == text


def test_cards_next_to_other_numbers_are_masked_alone():
    assert masked(f"5 {VISA} and 4111 1111 1111 1111 4012 8888 8888 1881") == (
        "5 [CARD] and [CARD] [CARD]"
    )


# ---------------------------------------------------------------- together


def test_every_kind_is_counted_and_the_mask_is_configurable():
    text = (
        "Reach jane@example.org or +1 415 555 2671, pay with 4111 1111 1111 1111; "
        "cc john@example.org at (415) 555-2672."
    )
    out, counts = redact(text, mask="<{kind}>")
    assert out == "Reach <EMAIL> or <PHONE>, pay with <CARD>; cc <EMAIL> at <PHONE>."
    assert counts == {"email": 2, "phone": 2, "card": 1}


def test_digits_in_an_email_address_are_part_of_the_address():
    assert redact("mail 4155552671@example.com")[1] == {"email": 1, "phone": 0, "card": 0}


def test_text_without_personal_data_is_unchanged():
    text = "Nothing to see here: 3 items, 2024, 12:30, $5."
    assert redact(text) == (text, {"email": 0, "phone": 0, "card": 0})


ADVERSARIAL = {
    "letters": "a" * 100_000,
    "local parts": "a." * 50_000 + "@",
    "at signs": "a@" * 50_000,
    "domain labels": "x@" + "a1." * 33_000,
    "digits": "4" * 100_000,
    "spaced digits": "1 " * 50_000 + "x",
    "dashed digits": "1-" * 50_000,
    "dotted digits": "1." * 50_000,
    "card groups": "4111 " * 20_000,
    "three-digit groups": "123 " * 25_000,
    "plus signs": "+1 " * 33_000,
    "parentheses": "(1) " * 25_000,
    "nested parentheses": "(1)" * 33_000,
    "times": "1:" * 50_000,
    "mixed": "+1 (2) 3-4.5 a@b. " * 5_000,
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_100kb_inputs_take_linear_time(name: str):
    text = ADVERSARIAL[name]
    started = time.perf_counter()
    redact(text)
    assert time.perf_counter() - started < 1.0  # quadratic backtracking takes minutes
