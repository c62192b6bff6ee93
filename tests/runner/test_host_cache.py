"""The host-memory cache of finished sequences' KV (runners/host_cache.py): found by the
longest shared head, saved once, extended entries replaced, least recently used dropped."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from runners.host_cache import HostPromptCache
from runners.kv_blocks import common_prefix

BLOCK = 4


def data(n_bytes: int, fill: int = 0) -> np.ndarray:
    return np.full(n_bytes, fill, dtype=np.uint8)


def test_the_entry_sharing_the_longest_head_is_found_with_its_length():
    cache = HostPromptCache(budget=1000, block_size=BLOCK)
    cache.add([1, 2, 3, 4, 5, 6, 7, 8, 9], data(10, 1))
    cache.add([1, 2, 3, 4, 5, 6, 70, 80, 90, 100], data(10, 2))
    entry, common = cache.find([1, 2, 3, 4, 5, 6, 7, 8, 42, 43])
    assert common == 8 and entry.data[0] == 1
    entry, common = cache.find([1, 2, 3, 4, 5, 6, 70, 80, 90])
    assert common == 9 and entry.data[0] == 2


def test_less_than_a_full_block_in_common_finds_nothing():
    cache = HostPromptCache(budget=1000, block_size=BLOCK)
    cache.add([1, 2, 3, 4, 5, 6, 7, 8], data(10))
    assert cache.find([1, 2, 3, 9, 5, 6, 7, 8]) == (None, 0)
    assert cache.find([9, 9]) == (None, 0)


def test_a_sequence_an_entry_already_holds_is_covered_and_a_longer_one_replaces_it():
    cache = HostPromptCache(budget=1000, block_size=BLOCK)
    cache.add([1, 2, 3, 4, 5, 6], data(10, 1))
    assert cache.covers([1, 2, 3, 4, 5]) and cache.covers([1, 2, 3, 4, 5, 6])
    assert not cache.covers([1, 2, 3, 4, 5, 7])
    cache.add([1, 2, 3, 4, 5, 6, 7, 8, 9], data(10, 2))  # extends the first: it goes
    assert len(cache) == 1 and cache.bytes == 10
    entry, common = cache.find([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert common == 9 and entry.data[0] == 2


def test_another_answer_to_a_prompt_or_a_later_turn_replaces_it_a_shared_head_does_not():
    cache = HostPromptCache(budget=1000, block_size=BLOCK)
    system, question = [1, 2, 3, 4, 5], [6, 7, 8]
    cache.add(system + question + [20, 21, 22], data(10, 1), prompt_len=8)
    cache.add(system + question + [30, 31], data(10, 2), prompt_len=8)  # the same prompt
    assert len(cache) == 1 and cache.find(system + question)[0].data[0] == 2
    later_turn = system + question + [30, 31, 40, 41]
    cache.add(later_turn + [50], data(10, 3), prompt_len=len(later_turn))
    assert len(cache) == 1 and cache.find(later_turn)[1] == len(later_turn)
    cache.add(system + [9, 9, 9, 60], data(10, 4), prompt_len=8)  # another question
    assert len(cache) == 2 and cache.bytes == 20
    assert cache.find(system + question)[1] == len(system + question)


def test_the_least_recently_used_go_first_when_the_budget_is_passed():
    cache = HostPromptCache(budget=30, block_size=BLOCK)
    for first in (10, 20, 30):
        cache.add([first, 1, 2, 3, 4], data(10, first))
    cache.find([10, 1, 2, 3, 4])  # used: now the most recent
    cache.add([40, 1, 2, 3, 4], data(10, 40))
    assert len(cache) == 3 and cache.bytes == 30 and cache.stats.evicted == 1
    assert cache.find([20, 1, 2, 3, 4]) == (None, 0)  # the least recently used went
    assert cache.find([10, 1, 2, 3, 4])[1] == 5


def test_what_is_shorter_than_a_block_or_larger_than_the_budget_is_not_kept():
    cache = HostPromptCache(budget=30, block_size=BLOCK)
    assert not cache.add([1, 2, 3], data(10))
    assert not cache.add([1, 2, 3, 4, 5], data(31))
    assert len(cache) == 0 and cache.bytes == 0


@settings(max_examples=60, deadline=None)
@given(
    sequences=st.lists(
        st.tuples(st.lists(st.integers(0, 3), min_size=BLOCK, max_size=14), st.integers(1, 14)),
        min_size=1,
        max_size=12,
    ),
    prompt=st.lists(st.integers(0, 3), min_size=0, max_size=14),
)
def test_find_agrees_with_a_scan_of_every_entry(sequences, prompt):
    """Whatever was added, the block index finds what comparing the prompt with every entry
    kept would: the longest shared head, when it spans a full block; and no entry kept
    holds another's prompt whole (the newer replaced it), for prompts of a block or more
    (shorter ones have no block of their own to be found by)."""
    cache = HostPromptCache(budget=10**6, block_size=BLOCK)
    for tokens, prompt_len in sequences:
        if not cache.covers(tokens):
            cache.add(tokens, data(1), prompt_len=prompt_len)
    entries = list(cache._entries.values())
    for a in entries:
        for b in entries:
            shortest = min(a.prompt_len, b.prompt_len)
            assert b is a or shortest < BLOCK or common_prefix(a.tokens, b.tokens) < shortest
    kept = [entry.tokens for entry in entries]
    best = max((common_prefix(tokens, prompt) for tokens in kept), default=0)
    entry, common = cache.find(prompt)
    if best < BLOCK:
        assert entry is None and common == 0
    else:
        assert common == best and common_prefix(entry.tokens, prompt) == best


def test_a_lookup_does_not_scan_every_entry(monkeypatch):
    """Ten thousand entries that share a system prompt: a lookup compares a bounded number
    of them token by token, not all."""
    rng = random.Random(0)
    cache = HostPromptCache(budget=10**9, block_size=16)
    system = list(range(1000, 1040))
    for _ in range(10_000):
        cache.add(system + [rng.randrange(50_000) for _ in range(60)], data(1))
    prompt = system + [rng.randrange(50_000) for _ in range(60)]
    import runners.host_cache as module

    calls = []
    monkeypatch.setattr(
        module, "common_prefix", lambda a, b: calls.append(1) or common_prefix(a, b)
    )
    _, common = cache.find(prompt)
    assert common >= 32 and len(calls) <= 32
