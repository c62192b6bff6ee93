"""The KV cache's bookkeeping: fixed-size blocks, a memory budget, and a prefix cache.

The KV memory of the native engine is one pool of ``num_blocks`` blocks of ``block_size``
token positions each, allocated once from a budget (:mod:`runners.batch_model` holds the
tensor; this module only counts). A sequence holds a list of blocks, its *block table*,
and the scheduler admits a request only when every block it can grow to (prompt plus
``max_tokens``) is free or can be freed: the engine then never runs out of KV memory in the
middle of a step, whatever the load. A request that does not fit waits in the queue.

Prefix caching: a full block whose tokens were computed is registered under a hash of its
tokens and of every token before it (a hash chain, so equal blocks after different
prefixes never match). A new request looks its prompt's full blocks up in that order and
reuses the longest run found, without computing them again: a shared system prompt, the
earlier turns of a conversation, the ``n`` choices of one prompt. Blocks no sequence holds
stay cached until their memory is needed, and then the least recently used go first (a
sequence's tail before its head, so a chain shrinks from its end).

Block 0 is never handed out: padding in block tables points at it, and it stays zero.

Pure Python, no torch: one scheduler thread calls it, between steps.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from contract.prefix import chain_hashes

NULL_BLOCK = 0
__all__ = ["Allocation", "BlockPool", "PrefixCacheStats", "chain_hashes"]


@dataclass(eq=False)
class Allocation:
    """The blocks one sequence holds, and how many more it may still take."""

    blocks: list[int] = field(default_factory=list)
    owed: int = 0  # blocks reserved for this sequence and not taken yet
    hashes: list[bytes] = field(default_factory=list)  # of its full, computed blocks
    prompt_hashes: list[bytes] = field(default_factory=list)  # known at admission
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which found, their KV reused


class BlockPool:
    """Counts the KV blocks: who holds which, which are cached, how many are promised."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("the KV budget holds less than one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.stats = PrefixCacheStats()
        # A stack: the block freed last is reused first, so churn keeps touching the same
        # few blocks (on a CPU the pool's pages are only resident once written).
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> block, for every registered block
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._reserved = 0  # sum of every allocation's ``owed``

    # -- what there is ------------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        """Token positions in the whole pool: the longest sequence it can ever hold."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def available(self) -> int:
        """Blocks a new request can be promised: free or cached-and-unheld, less promises."""
        return len(self._free) + len(self._evictable) - self._reserved

    @property
    def used_blocks(self) -> int:
        """Blocks held by sequences (not free, not merely cached)."""
        return self.num_blocks - 1 - len(self._free) - len(self._evictable)

    @property
    def cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held or not."""
        return len(self._cached)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- a sequence's life --------------------------------------------------------------------

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of ``hashes`` from the start."""
        found = []
        if self.prefix_caching:
            for digest in hashes:
                block = self._cached.get(digest)
                if block is None:
                    break
                found.append(block)
        return found

    def admit(
        self, prompt_ids: list[int], max_length: int, hashes: list[bytes]
    ) -> Allocation | None:
        """Reserve what a sequence of up to ``max_length`` tokens needs, reusing the cached
        blocks of its prompt; None (nothing changed) when the pool cannot promise that much.

        ``hashes`` are the prompt's full-block hashes. At most ``len(prompt_ids) - 1`` tokens
        come from the cache: the last prompt token is always computed, for its logits.
        """
        usable = (len(prompt_ids) - 1) // self.block_size
        hits = self.lookup(hashes[:usable])
        unheld = sum(1 for block in hits if self._refs[block] == 0)
        owed = self.blocks_for(max_length) - len(hits)
        if owed + unheld > self.available:
            return None
        for block in hits:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        self._reserved += owed
        if self.prefix_caching:
            self.stats.queries += len(prompt_ids)
            self.stats.hits += len(hits) * self.block_size
        return Allocation(
            blocks=list(hits),
            owed=owed,
            hashes=list(hashes[: len(hits)]),
            prompt_hashes=hashes,
            cached_tokens=len(hits) * self.block_size,
        )

    def grow(self, alloc: Allocation, length: int) -> None:
        """Give ``alloc`` blocks for ``length`` tokens, from its reservation."""
        while len(alloc.blocks) * self.block_size < length:
            if alloc.owed <= 0:
                raise RuntimeError("a sequence grew past the blocks reserved for it")
            alloc.blocks.append(self._take())
            alloc.owed -= 1
            self._reserved -= 1

    def commit(self, alloc: Allocation, token_ids: list[int], length: int) -> None:
        """Register the blocks now full with computed tokens (``token_ids[:length]``)."""
        if not self.prefix_caching:
            return
        full = min(length, len(token_ids)) // self.block_size
        if full <= len(alloc.hashes):
            return
        done = len(alloc.hashes)
        new = alloc.prompt_hashes[done:full]  # hashed at admission: not again
        if done + len(new) < full:  # blocks past the prompt's (generated tokens)
            parent = new[-1] if new else (alloc.hashes[-1] if alloc.hashes else b"")
            new = new + chain_hashes(token_ids[: full * self.block_size], self.block_size,
                                     parent, start=done + len(new))  # fmt: skip
        for index, digest in enumerate(new, start=len(alloc.hashes)):
            block = alloc.blocks[index]
            if digest not in self._cached and self._hash_of[block] is None:
                self._cached[digest] = block
                self._hash_of[block] = digest
        alloc.hashes += new

    def release(self, alloc: Allocation) -> None:
        """The sequence is done: its unused promise lapses; its blocks stay cached when they
        are registered (tail first in line for eviction), else go back to the free list."""
        self._reserved -= alloc.owed
        alloc.owed = 0
        for block in reversed(alloc.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._hash_of[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        alloc.blocks = []

    def clear_cache(self) -> None:
        """Forget every cached block no sequence holds."""
        while self._evictable:
            self._free.append(self._evict())

    def _take(self) -> int:
        block = self._free.pop() if self._free else self._evict()
        self._refs[block] = 1
        return block

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)  # least recently released
        digest = self._hash_of[block]
        self._hash_of[block] = None
        if digest is not None:
            del self._cached[digest]
        return block


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two token sequences share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n
