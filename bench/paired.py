"""Two servers measured turn by turn, both up at once: A over B from rounds that alternate.

The suite measures its servers one after the other, a minute or more apart; on these shared
machines that moved the 1-client ratio of ours on llama.cpp to llama-server between 1.04 and
1.34 over five runs of an afternoon. Here each round sends the same work to both, in
alternating order (A then B, then B then A), so whatever slows the machine slows both alike,
and the figure is the median over rounds of each round's own ratio:

* 1 client: one streamed request of the round's prompt (greedy, its output budget) to each;
  a round counts when both answered with the same number of tokens (the same work), and its
  ratio is A's latency over B's.
* ``clients`` clients: a burst of ``2 x clients`` requests to each; the ratio is A's output
  tokens per second over B's.

An idle server waits here while the other works (llama.cpp's threads sleep once their spin
ends; our processes wait on their sockets), so neither takes CPU from the other.

    python -m bench.paired --a ours=http://127.0.0.1:3005/v1 --b llama=http://127.0.0.1:3004/v1#m
    python -m bench.suite ... --paired-rounds 12   # llama-server and ours on llama.cpp
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from typing import Any

from bench.serving import RequestRecord, Target, WorkItem, make_workload, run_clients


def round_ratios(a: list[RequestRecord], b: list[RequestRecord]) -> tuple[list[float], int]:
    """Each round's latency ratio A / B, for the rounds where both answered with the same
    number of tokens; and how many rounds differed (or failed)."""
    ratios, differing = [], 0
    for x, y in zip(a, b, strict=True):
        if x.error or y.error or x.output_tokens != y.output_tokens or not y.latency:
            differing += 1
        else:
            ratios.append(x.latency / y.latency)
    return ratios, differing


def summary(ratios: list[float], differing: int = 0) -> dict[str, Any]:
    return {
        "rounds": len(ratios),
        "rounds_differing": differing,
        "median": statistics.median(ratios) if ratios else None,
        "min": min(ratios, default=None),
        "max": max(ratios, default=None),
    }


async def paired(
    a: Target, b: Target, work: list[WorkItem], *, rounds: int, clients: int
) -> dict[str, Any]:
    """1-client latency and ``clients``-client throughput of ``a`` over ``b``, round by round."""
    records: dict[str, list[RequestRecord]] = {a.name: [], b.name: []}
    burst_tps: dict[str, list[float]] = {a.name: [], b.name: []}
    for r in range(rounds):
        order = (a, b) if r % 2 == 0 else (b, a)
        item = work[r % len(work)]
        for target in order:
            _, (record,) = await run_clients(target, [item], 1, label=f"{target.name}: round {r}")
            records[target.name].append(record)
        burst = [work[(r * 2 * clients + i) % len(work)] for i in range(2 * clients)]
        for target in order:
            found, _ = await run_clients(target, burst, clients, label=f"{target.name}: burst {r}")
            burst_tps[target.name].append(found["output_tokens_per_s"] or 0.0)
    latency, differing = round_ratios(records[a.name], records[b.name])
    tps = [x / y for x, y in zip(burst_tps[a.name], burst_tps[b.name], strict=True) if y]
    return {
        "a": a.name,
        "b": b.name,
        "latency_1_client": summary(latency, differing),
        f"throughput_{clients}_clients": summary(tps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="[NAME=]URL[#MODEL]")
    parser.add_argument("--b", required=True, help="[NAME=]URL[#MODEL]")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = make_workload(4 * args.clients, seed=args.seed)
    found = asyncio.run(
        paired(Target.parse(args.a), Target.parse(args.b), work, rounds=args.rounds,
               clients=args.clients)
    )  # fmt: skip
    print(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
