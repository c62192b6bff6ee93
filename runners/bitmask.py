"""Token bitmasks in xgrammar's layout, with numpy alone.

Samplers and the closing guard make and read masks on every engine, for every request that
could be constrained; xgrammar itself (:mod:`runners.xgr`, which brings transformers' tokenizer
classes and tvm_ffi: 45 MiB of resident memory, measured in the llama.cpp runner) is loaded
only once a request brings a grammar.
"""

from __future__ import annotations

import numpy as np


def allocate_bitmask(rows: int, vocab_size: int) -> np.ndarray:
    """All tokens allowed, in xgrammar's layout (bit ``t % 32`` of word ``t // 32``)."""
    return np.full((rows, (vocab_size + 31) // 32), -1, dtype=np.int32)


def allowed(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """One row of a bitmask as one bool per token."""
    words = np.ascontiguousarray(bitmask_row).reshape(-1).view(np.uint32)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return bits[:vocab_size].astype(bool)
