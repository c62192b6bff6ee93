"""Prefix caching through a served API: a long system prompt shared by every question.

    python -m bench.prefix --url http://localhost:3000/v1 --questions 6

The first request carries a system prompt of about ``--prefix-tokens`` tokens (a seeded
rule book) and a short question; then more questions follow one at a time, each with the
same system prompt. With prefix caching the later ones skip the system prompt's prefill:
their time to first token (TTFT) is compared with the first one's. Greedy, a few tokens each,
streamed, so TTFT is the prefill. ``bench.suite`` runs it against each server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

from bench.serving import openai_client

QUESTIONS = [
    "Which rule covers lighthouses?", "Summarize rule 12.", "What does rule 40 say?",
    "Is there a rule about bread?", "Which rules mention chess?", "What is the last rule?",
    "Name three rules about the weather.", "Which rule is the longest?",
]  # fmt: skip
_THINGS = [
    "lighthouses", "bread", "chess", "the weather", "bicycles", "vaccines", "the planets",
    "photosynthesis", "rivers", "libraries", "trains", "gardens", "music", "bridges",
]  # fmt: skip
_ACTIONS = [
    "answer briefly and cite the rule number", "ask one clarifying question first",
    "give two examples and a short summary", "say which sources a reader could check",
    "explain it to a ten-year-old", "list the steps in order",
]  # fmt: skip


def rule_book(tokens: int, seed: int = 0) -> str:
    """A system prompt of roughly ``tokens`` tokens (about 21 per rule), the same per seed."""
    rng = random.Random(seed)
    rules = [
        f"Rule {i}: when a user asks about {rng.choice(_THINGS)}, {rng.choice(_ACTIONS)}."
        for i in range(1, max(2, tokens // 21) + 1)
    ]
    return "You are a careful assistant. Follow these rules.\n" + "\n".join(rules)


async def run_prefix(
    url: str, *, model: str | None = None, prefix_tokens: int = 2000, questions: int = 6,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """TTFT of the first question and of each later one, with the same long system prompt."""
    client = openai_client(url)
    if model is None:
        listed = (await client.models.list()).data
        model = listed[0].id if listed else "default"
    system = rule_book(prefix_tokens, seed)
    records = []
    for question in (QUESTIONS * (1 + questions // len(QUESTIONS)))[:questions]:
        start = time.perf_counter()
        ttft, usage = None, None
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content is not None:
                ttft = time.perf_counter() - start
            if chunk.usage is not None:
                usage = chunk.usage
        records.append({
            "ttft_s": ttft if ttft is not None else time.perf_counter() - start,
            "prompt_tokens": usage.prompt_tokens if usage else None,
        })  # fmt: skip
    await client.close()
    first, later = records[0]["ttft_s"], [r["ttft_s"] for r in records[1:]]
    later_p50 = statistics.median(later) if later else None
    return {
        "prompt_tokens": records[0]["prompt_tokens"],
        "first_ttft_s": first,
        "later_ttft_p50_s": later_p50,
        "ratio": later_p50 / first if later_p50 is not None and first else None,
        "records": records,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="an OpenAI-compatible /v1 URL")
    parser.add_argument("--model", default=None, help="model id (default: the first listed)")
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--questions", type=int, default=6)
    args = parser.parse_args(argv)
    found = asyncio.run(
        run_prefix(
            args.url, model=args.model, prefix_tokens=args.prefix_tokens, questions=args.questions
        )  # fmt: skip
    )
    print(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
