"""The prefix cache's block-hash chain: one definition for the runner's prefix cache
(``runners/kv_blocks.py``) and the API's router (``api/router.py``), which computes the same
chain over a prompt's token ids to find the replica that already holds its KV.

Pure Python, no torch.
"""

from __future__ import annotations

import hashlib
from array import array

# The KV block size the router assumes until a runner reports its own
# (``llm_runner_kv_cache_block_tokens``): the native engine's default, and vLLM's on a GPU.
DEFAULT_BLOCK_SIZE = 16


def chain_hashes(token_ids: list[int], block_size: int, parent: bytes = b"", start: int = 0):
    """Hashes of the full blocks of ``token_ids`` from block ``start`` on, each covering every
    token before it (``parent`` is the hash of block ``start - 1``), so equal blocks after
    different prefixes never match. A keyed-free BLAKE2b: collisions would hand one request
    another's KV, so Python's ``hash`` will not do."""
    out = []
    for begin in range(start * block_size, len(token_ids) - block_size + 1, block_size):
        block = array("q", token_ids[begin : begin + block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        out.append(parent)
    return out
