"""Choosing every row's next token of a step from logits in host memory, with numpy.

The engine's :class:`runners.work.Sampler` for a model whose logits are a numpy array
(llama.cpp: :mod:`runners.llamacpp_model`), so its runner never imports torch. The
semantics are :mod:`runners.sampling`'s, row for row: greedy is the argmax; sampling is the
exponential race (``argmax(p_i / E_i)``, ``E_i ~ Exp(1)`` from the request's own
generator, the same amount every step, so a seeded answer does not depend on the batch);
top-p keeps the smallest head whose mass reaches it; log-probabilities are over the logits
at the row's temperature (1 for greedy), before top-p, as OpenAI reports them. A row is
broken when its logits hold a NaN or +inf, or allow nothing: the greedy pick's own logit
tells all three.

The rows of a CPU step are few (at most 16 by default), so sampled rows are computed one
by one; greedy rows, the common case, are one argmax over the whole step.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from runners.bitmask import allocate_bitmask, allowed
from runners.work import Chosen, RowParams

_TINY_NOISE = np.float32(1e-20)  # as runners.sampling: no 0 / 0, no overflow


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    e = np.exp(shifted)
    return e / e.sum()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def choose(logits: np.ndarray, rows: list[RowParams]) -> list[Chosen]:
    """Each row's token (and log-probabilities where asked) from ``logits [n, vocab]``."""
    logits = np.asarray(logits, dtype=np.float32)
    n = logits.shape[0]
    tokens = logits.argmax(axis=-1)
    finite = np.isfinite(logits[np.arange(n), tokens])
    out = []
    with np.errstate(all="ignore"):  # a broken row's NaNs: it fails on ``finite``
        for i, row in enumerate(rows):
            token = int(tokens[i])
            if row.generator is not None and finite[i]:
                probs = _softmax(logits[i] / np.float32(row.temperature))
                if row.top_p < 1.0:
                    order = np.argsort(-probs, kind="stable")
                    head = probs[order]
                    head[np.cumsum(head) - head > row.top_p] = 0.0
                    probs = np.zeros_like(probs)
                    probs[order] = head
                noise = row.generator.standard_exponential(probs.shape[0], dtype=np.float32)
                token = int((probs / np.maximum(noise, _TINY_NOISE)).argmax())
            chosen = Chosen(token=token, finite=bool(finite[i]))
            if row.logprobs:
                temperature = 1.0 if row.generator is None else row.temperature
                logp = _log_softmax(logits[i] / np.float32(temperature))
                chosen.logprob = float(logp[token])
                k = row.top_logprobs
                if k:
                    best = np.argpartition(-logp, k - 1)[:k]
                    best = best[np.argsort(-logp[best], kind="stable")]
                    chosen.top = [(int(t), float(logp[t])) for t in best]
                else:
                    chosen.top = []
            out.append(chosen)
    return out


class NumpySampler:
    """The engine's sampler for numpy logits (:class:`runners.work.Sampler`)."""

    def generator(self, seed: int | None) -> np.random.Generator:
        return np.random.default_rng(seed)  # None: seeded from the OS

    def zeros(self, vocab_size: int) -> np.ndarray:
        return np.zeros(vocab_size, dtype=np.float32)

    def add_rows(self, logits: np.ndarray, rows: list[int], biases: list[Any]) -> None:
        logits[rows] += np.stack(biases)

    def mask(self, logits: np.ndarray, constraints: dict[int, Any]) -> None:
        vocab = logits.shape[1]
        bitmask = allocate_bitmask(logits.shape[0], vocab)
        for row, constraint in constraints.items():
            constraint.fill(bitmask, row)
            logits[row, ~allowed(bitmask[row], vocab)] = -np.inf
            if constraint.never:
                logits[row, constraint.never] = -np.inf

    def choose(self, logits: np.ndarray, rows: list[RowParams]) -> list[Chosen]:
        return choose(logits, rows)

    def session(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()
