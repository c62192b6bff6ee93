"""The samplers, torch's (batched, on the device) and numpy's (host logits, llama.cpp), each
against the same checks: exact distributions, top-p, per-row seeds, logprobs, broken rows."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from runners import host_sampling, sampling
from runners.work import RowParams


@dataclass
class Impl:
    choose: Callable[..., Any]
    generator: Callable[[int], Any]
    array: Callable[[torch.Tensor], Any]

    def seeded(self, seed: int, **options) -> RowParams:
        return RowParams(generator=self.generator(seed), **options)


IMPLS = {
    "torch": Impl(sampling.choose, lambda seed: torch.Generator().manual_seed(seed), lambda t: t),
    "numpy": Impl(host_sampling.choose, np.random.default_rng, lambda t: t.numpy().copy()),
}


@pytest.fixture(params=sorted(IMPLS))
def s(request) -> Impl:
    return IMPLS[request.param]


def test_sampling_follows_the_softmax_at_the_temperature(s):
    logits = s.array(torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]])))
    counts = collections.Counter()
    row = s.seeded(0, temperature=1.0)
    for _ in range(4000):
        counts[s.choose(logits, [row])[0].token] += 1
    assert counts[3] == 0
    for token, p in enumerate([0.5, 0.3, 0.2]):
        assert abs(counts[token] / 4000 - p) < 0.03, counts
    # Temperature 0.5 squares the odds: 0.5 : 0.3 : 0.2 becomes 25 : 9 : 4.
    cold = s.seeded(1, temperature=0.5)
    picks = collections.Counter(s.choose(logits, [cold])[0].token for _ in range(4000))
    assert abs(picks[0] / 4000 - 25 / 38) < 0.03, picks


def test_top_p_keeps_only_the_head_of_the_distribution(s):
    logits = s.array(torch.tensor([[5.0, 4.9, -10.0, -10.0]]))
    narrow, wide = s.seeded(0, top_p=0.5), s.seeded(0, top_p=1.0)
    assert {s.choose(logits, [narrow])[0].token for _ in range(100)} == {0}
    assert {s.choose(logits, [wide])[0].token for _ in range(300)} == {0, 1}


def test_rows_are_independent_of_the_batch_around_them(s):
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    alone = s.choose(s.array(logits[1:2]), [s.seeded(7, top_p=0.9)])[0].token
    batch = s.choose(s.array(logits), [
        RowParams(generator=None), s.seeded(7, top_p=0.9), s.seeded(3), RowParams(generator=None)
    ])  # fmt: skip
    assert batch[1].token == alone
    assert batch[0].token == int(logits[0].argmax()) and batch[3].token == int(logits[3].argmax())


def test_a_seed_repeats_its_answer_and_another_seed_does_not(s):
    torch.manual_seed(2)
    logits = s.array(torch.randn(1, 5000))
    draws = [[s.choose(logits, [row])[0].token for _ in range(20)]
             for row in (s.seeded(11), s.seeded(11), s.seeded(12))]  # fmt: skip
    assert draws[0] == draws[1] != draws[2]


def test_logprobs_are_over_the_logits_at_the_rows_temperature(s):
    torch.manual_seed(1)
    logits = torch.randn(3, 20)
    rows = [
        RowParams(generator=None, logprobs=True, top_logprobs=3),
        s.seeded(5, temperature=0.7, logprobs=True, top_logprobs=0),
        RowParams(generator=None),
    ]
    out = s.choose(s.array(logits), rows)
    greedy = torch.log_softmax(logits[0], -1)
    assert out[0].token == int(logits[0].argmax())
    assert abs(out[0].logprob - float(greedy.max())) < 1e-6
    top = torch.topk(greedy, 3)
    assert [t for t, _ in out[0].top] == [int(i) for i in top.indices]
    for (_, got), want in zip(out[0].top, top.values, strict=True):
        assert abs(got - float(want)) < 1e-6
    warm = torch.log_softmax(logits[1] / 0.7, -1)
    assert abs(out[1].logprob - float(warm[out[1].token])) < 1e-6 and out[1].top == []
    assert out[2].logprob is None


def test_a_row_of_non_finite_logits_is_flagged_and_the_others_are_not(s):
    logits = torch.tensor([[1.0, 2.0, 0.0], [float("nan"), 1.0, 0.0], [0.0, 0.0, 5.0]])
    out = s.choose(s.array(logits), [RowParams(generator=None), s.seeded(0), s.seeded(1)])
    assert [o.finite for o in out] == [True, False, True]
    assert out[0].token == 1 and out[2].token == 2


def test_every_kind_of_broken_row_is_flagged_wherever_it_breaks(s):
    """NaN or +inf at any place in a large vocabulary (not only at the row's maximum), and a
    row that allows nothing, are flagged; a row masked down to one token is not."""
    vocab = 49152
    generator = torch.Generator().manual_seed(3)
    for at in (0, 1, 777, vocab // 2, vocab - 1):
        logits = torch.randn(6, vocab, generator=generator)
        logits[0, at] = float("nan")
        logits[1, at] = float("inf")
        logits[2] = float("-inf")
        logits[3, at], logits[3, (at + 5) % vocab] = float("nan"), float("inf")
        logits[4] = float("-inf")
        logits[4, at] = 0.5  # masked to one allowed token: fine
        rows = [RowParams(generator=None), s.seeded(at), RowParams(generator=None), s.seeded(1),
                RowParams(generator=None), s.seeded(2)]  # fmt: skip
        out = s.choose(s.array(logits), rows)
        assert [o.finite for o in out] == [False, False, False, False, True, True], at
        assert out[4].token == at


def test_a_sampled_row_masked_to_few_tokens_picks_only_among_them(s):
    """What a grammar's mask leaves: -inf everywhere else, never picked at any temperature."""
    logits = torch.full((1, 1000), float("-inf"))
    logits[0, [3, 500, 999]] = torch.tensor([0.1, 0.2, 0.3])
    row = s.seeded(4, temperature=1.5, top_p=0.95)
    picks = {s.choose(s.array(logits), [row])[0].token for _ in range(200)}
    assert picks == {3, 500, 999}
