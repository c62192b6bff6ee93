"""The KV block pool's bookkeeping: reservations, sharing, eviction (no model needed)."""

from __future__ import annotations

import pytest

from runners.kv_blocks import BlockPool, chain_hashes

BS = 4


def admit(pool: BlockPool, prompt: list[int], max_length: int):
    return pool.admit(prompt, max_length, chain_hashes(prompt, pool.block_size))


def test_hashes_cover_everything_before_a_block():
    one = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS)
    other = chain_hashes([9, 2, 3, 4, 5, 6, 7, 8], BS)
    assert len(one) == 2 and one[0] != other[0]
    assert one[1] != other[1]  # the same tokens after a different prefix
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS) == one  # partial blocks: none
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS, one[0], start=1) == one[1:]


def test_admission_reserves_what_a_sequence_can_grow_to_and_no_more():
    pool = BlockPool(11, BS)  # 10 usable blocks, 40 positions
    first = admit(pool, [1, 2, 3], 20)  # 5 blocks promised
    assert first is not None and first.owed == 5 and pool.available == 5
    assert admit(pool, [4, 5, 6], 24) is None  # 6 more do not fit: nothing changes
    assert pool.available == 5
    pool.grow(first, 3)
    assert len(first.blocks) == 1 and first.owed == 4 and pool.available == 5
    with pytest.raises(RuntimeError):
        pool.grow(first, 21)  # past its reservation
    pool.release(first)
    assert pool.available == 10 and pool.used_blocks == 0


def test_a_cached_prefix_is_shared_and_its_last_token_still_computed():
    pool = BlockPool(33, BS)
    prompt = list(range(100, 112))  # 3 full blocks
    first = admit(pool, prompt, 16)
    pool.grow(first, 12)
    pool.commit(first, prompt, 12)
    assert pool.cached_blocks == 3
    # The same prompt: two blocks reused, the third recomputed for the last token's logits.
    again = admit(pool, prompt, 16)
    assert again.cached_tokens == 8 and again.blocks == first.blocks[:2]
    # A longer prompt on the same prefix reuses all three.
    longer = admit(pool, prompt + [7, 7], 20)
    assert longer.cached_tokens == 12 and longer.blocks == first.blocks
    assert pool.stats.queries == 12 + 12 + 14 and pool.stats.hits == 8 + 12
    # Shared blocks go back to the cache only when the last holder lets go.
    for alloc in (first, again, longer):
        pool.release(alloc)
    assert pool.used_blocks == 0 and pool.cached_blocks == 3


def test_the_least_recently_used_blocks_are_evicted_first_tail_before_head():
    pool = BlockPool(5, BS)  # 4 usable blocks
    a, b = list(range(10, 18)), list(range(20, 28))  # 2 blocks each
    for prompt in (a, b):
        alloc = admit(pool, prompt, 8)
        pool.grow(alloc, 8)
        pool.commit(alloc, prompt, 8)
        pool.release(alloc)
    assert pool.cached_blocks == 4 and pool.available == 4
    # Touch a again (a hit), so b is now the least recently used.
    pool.release(admit(pool, a + [1], 9))
    # A new sequence needing 2 blocks takes b's, tail first: b's head block goes last.
    c = admit(pool, [1, 2, 3], 5)
    pool.grow(c, 5)
    assert pool.lookup(chain_hashes(a, BS)) and not pool.lookup(chain_hashes(b, BS))
    assert pool.available == 2  # a's blocks, still cached and free to evict


def test_without_prefix_caching_nothing_is_kept():
    pool = BlockPool(9, BS, prefix_caching=False)
    prompt = list(range(8))
    alloc = admit(pool, prompt, 8)
    pool.grow(alloc, 8)
    pool.commit(alloc, prompt, 8)
    pool.release(alloc)
    assert pool.cached_blocks == 0 and admit(pool, prompt, 8).cached_tokens == 0
    assert pool.stats.queries == 0


def test_blocks_of_generated_tokens_chain_on_from_the_prompts():
    """The next turn of a conversation (prompt + answer + more) finds the answer's blocks."""
    pool = BlockPool(33, BS)
    prompt, answer = list(range(100, 106)), [7, 8, 9, 10, 11, 12]  # 1.5 blocks, then 1.5
    alloc = admit(pool, prompt, 16)
    pool.grow(alloc, 12)
    pool.commit(alloc, prompt + answer, 12)  # 3 full blocks: 1 of prompt, 2 past it
    assert alloc.hashes == chain_hashes(prompt + answer, BS)  # the chain, as if hashed whole
    pool.release(alloc)
    turn = admit(pool, prompt + answer + [1, 2], 20)
    assert turn.cached_tokens == 12 and len(turn.blocks) == 3
