"""Choosing every row's next token of a step at once, on the logits' device.

A step's rows mix greedy and sampled requests, each with its own temperature, top-p, seed
and log-probability request. Everything here is batched tensor work; the host reads the
result once per step (:meth:`Choice.to_host`), not once per row, which on a GPU is the
difference between one synchronisation and a hundred.

Sampling is the *exponential race*: with ``E_i ~ Exp(1)`` drawn independently per token,
``argmax(p_i / E_i)`` picks token ``i`` with probability ``p_i``, exactly as a multinomial
draw would, but as one batched ``argmax``. Each seeded request draws its noise from its own
generator, the same amount every step, so its answer is the same whatever else is in the
batch.

:class:`TorchSampler` is the engine's :class:`runners.work.Sampler` for torch logits (our
native engine, on any device); :mod:`runners.host_sampling` is the same for numpy arrays.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from runners.bitmask import allocate_bitmask
from runners.work import Chosen, RowParams

# Exp(1) noise this small turns p / E into an overflow for p > 0 and 0 / 0 for p = 0.
_TINY_NOISE = 1e-20


def choose(logits: torch.Tensor, rows: list[RowParams]) -> list[Chosen]:
    """Each row's token (and log-probabilities where asked) from ``logits [n, vocab]``,
    computed on its device and read back with one transfer."""
    n, vocab = logits.shape
    dev = logits.device
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # greedy rows' picks; sampled rows are overwritten
    # A row is broken by a NaN or +inf anywhere, or when nothing is allowed; -inf alone is
    # how masks (structured outputs) rule tokens out. argmax picks a NaN wherever one is,
    # else a +inf, else -inf only when all are: so the greedy pick's own logit tells all
    # three, in one gather instead of three passes over the vocabulary (0.5 ms a step on a
    # CPU thread, for a 49k vocabulary; tests/runner/test_sampling.py checks each case).
    finite = torch.isfinite(logits.gather(1, tokens[:, None]).squeeze(1))
    sampled = [i for i, row in enumerate(rows) if row.generator is not None]
    if sampled:
        index = torch.tensor(sampled, device=dev)
        temperature = torch.tensor([rows[i].temperature for i in sampled], device=dev)
        probs = torch.softmax(logits[index] / temperature[:, None], dim=-1)
        nucleus = [j for j, i in enumerate(sampled) if rows[i].top_p < 1.0]
        if nucleus:  # sorting is the costly part: only for the rows that need it
            at = torch.tensor(nucleus, device=dev)
            top_p = torch.tensor([rows[sampled[j]].top_p for j in nucleus], device=dev)
            head, order = torch.sort(probs[at], dim=-1, descending=True)
            # Keep the smallest head whose mass reaches top_p (the first token always stays).
            head.masked_fill_(torch.cumsum(head, dim=-1) - head > top_p[:, None], 0.0)
            probs[at] = torch.zeros_like(head).scatter_(1, order, head)
        noise = torch.empty(len(sampled), vocab, device=dev)
        for j, i in enumerate(sampled):  # each from its own generator: batch-independent
            noise[j].exponential_(generator=rows[i].generator)
        tokens[index] = (probs / noise.clamp_min_(_TINY_NOISE)).argmax(dim=-1)
    parts = [tokens.double(), finite.double()]
    wanted = [i for i, row in enumerate(rows) if row.logprobs]
    k = max((rows[i].top_logprobs for i in wanted), default=0)
    if wanted:
        parts.append(_logprob_table(logits, tokens, rows, wanted, k).flatten())
    host = torch.cat(parts).tolist()  # the step's one read-back
    out = [Chosen(token=int(host[i]), finite=bool(host[n + i])) for i in range(n)]
    width = 1 + 2 * k
    for line, i in enumerate(wanted):
        values = host[2 * n + line * width : 2 * n + (line + 1) * width]
        keep = rows[i].top_logprobs
        out[i].logprob = values[0]
        ids, logprobs = values[1 + k : 1 + k + keep], values[1 : 1 + keep]
        out[i].top = [(int(t), p) for t, p in zip(ids, logprobs, strict=True)]
    return out


def _logprob_table(
    logits: torch.Tensor, tokens: torch.Tensor, rows: list[RowParams], wanted: list[int], k: int
) -> torch.Tensor:
    """``[len(wanted), 1 + 2k]``: the chosen token's log-probability, then the ``k`` best
    log-probabilities and their token ids (float64 holds both exactly). Over the logits at
    the row's temperature (1 for greedy), before top-p: what OpenAI reports."""
    dev = logits.device
    index = torch.tensor(wanted, device=dev)
    temperature = torch.tensor(
        [1.0 if rows[i].generator is None else rows[i].temperature for i in wanted], device=dev
    )
    logp = torch.log_softmax(logits[index] / temperature[:, None], dim=-1)
    chosen = logp.gather(1, tokens[index].unsqueeze(1))
    values, ids = torch.topk(logp, k, dim=-1)  # sorted, best first; k may be 0
    return torch.cat([chosen.double(), values.double(), ids.double()], dim=1)


class TorchSampler:
    """The engine's sampler for torch logits on ``device``: penalties, grammar masks and
    :func:`choose`, all on the device."""

    def __init__(self, device: torch.device):
        self.device = device

    def generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator

    def zeros(self, vocab_size: int) -> torch.Tensor:
        return torch.zeros(vocab_size, dtype=torch.float32, device=self.device)

    def add_rows(self, logits: torch.Tensor, rows: list[int], biases: list[Any]) -> None:
        logits.index_add_(0, torch.tensor(rows, device=logits.device), torch.stack(biases))

    def mask(self, logits: torch.Tensor, constraints: dict[int, Any]) -> None:
        import xgrammar  # torch is loaded: the whole package, with its mask kernels

        bitmask = allocate_bitmask(logits.shape[0], logits.shape[1])
        for row, constraint in constraints.items():
            constraint.fill(bitmask, row)
        xgrammar.apply_token_bitmask_inplace(
            logits, torch.from_numpy(bitmask).to(logits.device), indices=sorted(constraints)
        )
        for row, constraint in constraints.items():
            if constraint.never:
                logits[row, constraint.never] = float("-inf")

    def choose(self, logits: torch.Tensor, rows: list[RowParams]) -> list[Chosen]:
        return choose(logits, rows)

    def session(self) -> contextlib.AbstractContextManager[Any]:
        return torch.inference_mode()
