"""The batched sampler: exact distributions, top-p, per-row seeds, one read-back."""

from __future__ import annotations

import collections

import torch

from runners.sampling import RowParams, choose


def seeded(seed: int, **options) -> RowParams:
    return RowParams(generator=torch.Generator().manual_seed(seed), **options)


def test_sampling_follows_the_softmax_at_the_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    counts = collections.Counter()
    row = seeded(0, temperature=1.0)
    for _ in range(4000):
        counts[choose(logits, [row])[0].token] += 1
    assert counts[3] == 0
    for token, p in enumerate([0.5, 0.3, 0.2]):
        assert abs(counts[token] / 4000 - p) < 0.03, counts
    # Temperature 0.5 squares the odds: 0.5 : 0.3 : 0.2 becomes 25 : 9 : 4.
    cold = seeded(1, temperature=0.5)
    picks = collections.Counter(choose(logits, [cold])[0].token for _ in range(4000))
    assert abs(picks[0] / 4000 - 25 / 38) < 0.03, picks


def test_top_p_keeps_only_the_head_of_the_distribution():
    logits = torch.tensor([[5.0, 4.9, -10.0, -10.0]])
    narrow, wide = seeded(0, top_p=0.5), seeded(0, top_p=1.0)
    assert {choose(logits, [narrow])[0].token for _ in range(100)} == {0}
    assert {choose(logits, [wide])[0].token for _ in range(300)} == {0, 1}


def test_rows_are_independent_of_the_batch_around_them():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    alone = [choose(logits[1:2], [seeded(7, top_p=0.9)])[0].token for _ in range(1)]
    batch = choose(logits, [
        RowParams(generator=None), seeded(7, top_p=0.9), seeded(3), RowParams(generator=None)
    ])  # fmt: skip
    assert batch[1].token == alone[0]
    assert batch[0].token == int(logits[0].argmax()) and batch[3].token == int(logits[3].argmax())


def test_logprobs_are_over_the_logits_at_the_rows_temperature():
    torch.manual_seed(1)
    logits = torch.randn(3, 20)
    rows = [
        RowParams(generator=None, logprobs=True, top_logprobs=3),
        seeded(5, temperature=0.7, logprobs=True, top_logprobs=0),
        RowParams(generator=None),
    ]
    out = choose(logits, rows)
    greedy = torch.log_softmax(logits[0], -1)
    assert out[0].token == int(logits[0].argmax())
    assert abs(out[0].logprob - float(greedy.max())) < 1e-6
    top = torch.topk(greedy, 3)
    assert out[0].top == [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)]
    warm = torch.log_softmax(logits[1] / 0.7, -1)
    assert abs(out[1].logprob - float(warm[out[1].token])) < 1e-6 and out[1].top == []
    assert out[2].logprob is None


def test_a_row_of_non_finite_logits_is_flagged_and_the_others_are_not():
    logits = torch.tensor([[1.0, 2.0, 0.0], [float("nan"), 1.0, 0.0], [0.0, 0.0, 5.0]])
    out = choose(logits, [RowParams(generator=None), seeded(0), seeded(1)])
    assert [o.finite for o in out] == [True, False, True]
    assert out[0].token == 1 and out[2].token == 2


def test_every_kind_of_broken_row_is_flagged_wherever_it_breaks():
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
        rows = [RowParams(generator=None), seeded(at), RowParams(generator=None), seeded(1),
                RowParams(generator=None), seeded(2)]  # fmt: skip
        out = choose(logits, rows)
        assert [o.finite for o in out] == [False, False, False, False, True, True], at
        assert out[4].token == at
