"""Finished sequences' KV in host memory: a prompt that starts like one served before gets its
prefix back by a copy instead of computing it again.

A model that keeps finished sequences in its own cells (llama.cpp) can keep only a few there:
each decode step's attention spans the cells in use, so every kept cell slows every step. When
a finished sequence leaves the cells, its KV is saved here instead (a few MB per hundred
tokens, copied in about a millisecond); a later prompt sharing its head copies that back into
a slot, in about half a millisecond for 150 tokens where a CPU would compute them in most of a
second. llama.cpp's own server does the same with its prompt cache (``--cache-ram``).

Entries are the token ids a sequence held and the bytes the model saved for them, kept least
recently used first within a byte budget. They are found by the hash chain of their full
blocks (:func:`contract.prefix.chain_hashes`): a lookup walks the prompt's blocks, not the
entries, so it costs the same with ten entries or ten thousand. A sequence that merely starts
another one held is not saved twice, and a new one replaces the entries whose prompt it starts
with: a later turn of the same conversation, or another answer to the same prompt (sampled, or
cut at another length), so each prompt is kept once, with its latest answer, as llama-server
keeps it (prompts of a block or more: a shorter one has no block of its own to be found by).
Entries that share only a head (a system prompt) stay side by side.

Pure Python and numpy: what the bytes are is the model's business.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from contract.prefix import chain_hashes
from runners.kv_blocks import common_prefix

_CANDIDATES = 32  # entries compared token by token past the deepest block they share


@dataclass
class Entry:
    tokens: list[int]
    data: np.ndarray  # what the model saved (uint8)
    hashes: list[bytes]  # chain hashes of the full blocks of ``tokens``
    prompt_len: int  # how many of ``tokens`` were its prompt (the rest, its answer)
    prompt_end: bytes  # the hash of its prompt's last full block (its first block's, if none)


@dataclass
class HostCacheStats:
    saved: int = 0  # entries added
    evicted: int = 0  # entries dropped for the budget
    restores: int = 0  # prompts that got a prefix back from here
    restored_tokens: int = 0


class HostPromptCache:
    """Token sequences and their saved KV, least recently used first, ``budget`` bytes."""

    def __init__(self, budget: int, block_size: int):
        self.budget = budget
        self.block_size = block_size
        self.bytes = 0
        self.stats = HostCacheStats()
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._by_block: dict[bytes, set[int]] = {}  # block hash -> entries holding that block
        self._prompt_ends: dict[bytes, set[int]] = {}  # block hash -> entries, by prompt_end
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, prompt: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest head with ``prompt`` (at least one full block), and
        how many tokens they share; it becomes the most recently used."""
        hashes = chain_hashes(prompt, self.block_size)
        depth = 0
        while depth < len(hashes) and hashes[depth] in self._by_block:
            depth += 1
        if depth == 0:
            return None, 0
        # All of these share ``depth`` blocks and none shares more: only the tokens past them
        # tell them apart. The most recently saved are compared, a bounded number.
        found = self._by_block[hashes[depth - 1]]
        best, best_len = None, 0
        for entry_id in heapq.nlargest(_CANDIDATES, found):
            entry = self._entries[entry_id]
            common = common_prefix(entry.tokens, prompt)
            if common > best_len:
                best, best_len = entry_id, common
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        return self._entries[best], best_len

    def covers(self, tokens: list[int]) -> bool:
        """Whether an entry holds all of ``tokens`` (saving them would add nothing)."""
        hashes = chain_hashes(tokens, self.block_size)
        if not hashes or hashes[-1] not in self._by_block:
            return False
        return any(
            common_prefix(self._entries[i].tokens, tokens) == len(tokens)
            for i in heapq.nlargest(_CANDIDATES, self._by_block[hashes[-1]])
        )

    def add(self, tokens: list[int], data: np.ndarray, prompt_len: int | None = None) -> bool:
        """Keep ``data`` for ``tokens`` (the first ``prompt_len`` of them its prompt; default:
        all), dropping the entries whose prompt it starts with, then the least recently used
        until the budget holds; False if it is shorter than a block or larger than the whole
        budget."""
        if len(tokens) < self.block_size or data.nbytes > self.budget:
            return False
        prompt_len = len(tokens) if prompt_len is None else min(prompt_len, len(tokens))
        hashes = chain_hashes(tokens, self.block_size)
        for block in hashes:
            for entry_id in list(self._prompt_ends.get(block, ())):
                old = self._entries[entry_id]
                if common_prefix(old.tokens, tokens) >= old.prompt_len:
                    self._remove(entry_id)  # its prompt again, or its conversation going on
        entry_id, self._next_id = self._next_id, self._next_id + 1
        prompt_end = hashes[max(0, min(prompt_len // self.block_size, len(hashes)) - 1)]
        self._entries[entry_id] = Entry(list(tokens), data, hashes, prompt_len, prompt_end)
        for block in hashes:
            self._by_block.setdefault(block, set()).add(entry_id)
        self._prompt_ends.setdefault(prompt_end, set()).add(entry_id)
        self.bytes += data.nbytes
        self.stats.saved += 1
        while self.bytes > self.budget:
            self._remove(next(iter(self._entries)))
            self.stats.evicted += 1
        return True

    def _remove(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.bytes -= entry.data.nbytes
        for block in entry.hashes:
            holders = self._by_block[block]
            holders.discard(entry_id)
            if not holders:
                del self._by_block[block]
        ends = self._prompt_ends[entry.prompt_end]
        ends.discard(entry_id)
        if not ends:
            del self._prompt_ends[entry.prompt_end]
