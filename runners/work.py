"""What the engine's scheduler exchanges with a model and a sampler, without torch.

:class:`Work` and :class:`BatchModel` are a step and what runs it; :class:`Sampler` turns a
step's logits into tokens. The scheduler (:mod:`runners.engine`) knows only these, so an
engine whose logits are host arrays (llama.cpp, :mod:`runners.llamacpp_model`) runs in a
process that never imports torch: :mod:`runners.sampling` samples torch tensors on their
device, :mod:`runners.host_sampling` numpy arrays.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Work:
    """One sequence's share of a step."""

    slot: int  # the sequence's batch slot (SequentialHF keys its caches by it)
    token_ids: list[int]
    position: int  # cache position of token_ids[0]; tokens before it are cached already
    want_logits: bool = True  # False for a prefill chunk that does not end the prompt
    blocks: tuple[int, ...] = ()  # the block table: KV blocks for positions 0, bs, 2 bs, ...


class BatchModel(Protocol):
    max_slots: int
    context_length: int
    vocab_size: int
    paged: bool  # whether forward reads Work.blocks (and so can share prefix blocks)

    def forward(self, work: list[Work]) -> Any:
        """Logits ``[n, vocab]`` for the items with ``want_logits``, in order (a tensor or
        an array: what the engine's :class:`Sampler` takes)."""
        ...

    def release(self, slot: int) -> None: ...

    def kv_bytes_per_token(self) -> int:
        """KV memory one token position takes, all layers."""
        ...


@dataclass(frozen=True)
class RowParams:
    """How one row chooses its token."""

    generator: Any  # the sampler's random generator; None: greedy
    temperature: float = 1.0
    top_p: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Chosen:
    """What the host reads back for one row."""

    token: int
    finite: bool  # False when the row's logits held NaN or +inf, or allowed nothing
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class Sampler(Protocol):
    """The array work of a step after the model: penalties, grammar masks, the choice."""

    def generator(self, seed: int | None) -> Any:
        """A random generator of a sampled request's own (seeded, or from the OS)."""
        ...

    def zeros(self, vocab_size: int) -> Any:
        """A float32 vector for a request's penalty bias (``bias[token] -= delta`` works)."""
        ...

    def add_rows(self, logits: Any, rows: list[int], biases: list[Any]) -> None:
        """``logits[rows[i]] += biases[i]``, in place."""
        ...

    def mask(self, logits: Any, constraints: dict[int, Any]) -> None:
        """Rule out, in place, every token that would take row ``i`` out of its grammar
        (``constraints[i]``, a :class:`runners.grammar.Constraint`)."""
        ...

    def choose(self, logits: Any, rows: list[RowParams]) -> list[Chosen]:
        """Each row's token, and its log-probabilities where asked."""
        ...

    def session(self) -> AbstractContextManager[Any]:
        """What the scheduler thread runs inside (torch's inference mode, or nothing)."""
        ...
