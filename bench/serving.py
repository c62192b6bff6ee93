"""Serving benchmark: N concurrent streaming clients against any OpenAI-compatible URL.

    python -m bench.serving --url ours=http://localhost:3000/v1 --clients 8 --requests 32
    python -m bench.serving --url peer=http://localhost:8000/v1#MODEL_DIR   # '#': model id
    python -m bench.serving --url http://localhost:3000/v1 --scenario latency \
        --baselines ~/bentoml/models/smollm2-135m-instruct/latest

Every request streams with ``stream_options.include_usage`` and greedy decoding, and sends
the same system prompt, so every server renders the same prompt and greedy decoding gives
the same tokens. The workload (mixed prompt and output lengths, seeded) is the same for
every target. Scenarios:

* ``throughput``: ``--clients`` concurrent clients work through ``--requests`` requests.
* ``latency``: one client, the first ``--latency-requests`` requests, one at a time.
* ``drop``: ``--drop-streams`` streams ask for ``--drop-tokens`` tokens each and are closed
  after their first token; then one request is timed against the same request on the idle
  server. A server that keeps generating for dropped streams shows it here.

``--baselines MODEL_DIR`` runs the same workload in process with plain ``model.generate``:
one request at a time, and in static batches of ``--clients``. Prints a table and writes
every figure to a JSON file. ``python -m bench.suite`` starts the servers and runs all of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TOPICS = [
    "the water cycle", "how a bicycle works", "the history of Paris", "photosynthesis",
    "why the sky is blue", "how to bake bread", "the planets of the solar system",
    "the rules of chess", "how vaccines work", "the French revolution",
]  # fmt: skip


SYSTEM_PROMPT = "You are a helpful AI assistant."


@dataclass(frozen=True)
class WorkItem:
    prompt: str
    max_tokens: int


def make_workload(n: int, *, min_tokens: int = 16, max_tokens: int = 128, seed: int = 0):
    """``n`` requests with mixed prompt lengths and output budgets, the same for a seed."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        detail = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(0, 12)))
        prompt = f"Explain {topic} in detail." + (f" Also mention: {detail}." if detail else "")
        items.append(WorkItem(prompt, rng.randint(min_tokens, max_tokens)))
    return items


@dataclass
class RequestRecord:
    """One request's timings (seconds from its start) and its output token count."""

    latency: float
    ttft: float | None
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between ranks; None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(records: list[RequestRecord], wall: float) -> dict[str, float | int | None]:
    """Throughput and latency figures of one run."""
    ok = [r for r in records if r.error is None]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    latency = [r.latency for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "itl_p50_s": percentile(itl, 50),
        "itl_p95_s": percentile(itl, 95),
        "latency_p50_s": percentile(latency, 50),
        "latency_p95_s": percentile(latency, 95),
        "mean_output_tokens": statistics.fmean([r.output_tokens for r in ok]) if ok else 0.0,
    }


# ------------------------------------------------------------------ against a server


@dataclass(frozen=True)
class Target:
    """A server under test: a display name, its OpenAI base URL, the model id it wants."""

    name: str
    url: str
    model: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Target:
        """``[NAME=]URL[#MODEL]``."""
        name, _, rest = spec.rpartition("=") if "=" in spec.split("#")[0] else ("", "", spec)
        url, _, model = rest.partition("#")
        return cls(name or url, url, model or None)


def messages_for(item: WorkItem) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": item.prompt},
    ]


async def _one_request(
    client, model: str, item: WorkItem, *, drop_after_first: bool = False
) -> RequestRecord:
    start = time.perf_counter()
    record = RequestRecord(latency=0.0, ttft=None)
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages_for(item),
            max_tokens=item.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.perf_counter() - start
                record.ttft = now if record.ttft is None else record.ttft
                record.token_times.append(now)
                if drop_after_first:
                    await stream.close()  # the client goes away mid-answer
                    break
            if chunk.usage is not None:
                record.output_tokens = chunk.usage.completion_tokens
        if not record.output_tokens:
            record.output_tokens = len(record.token_times)
    except Exception as exc:  # a benchmark reports failures, it does not stop on them
        record.error = f"{type(exc).__name__}: {exc}"
    record.latency = time.perf_counter() - start
    return record


def openai_client(url: str):
    """The official client as the benchmarks use it: no retries (a failure is counted, not
    hidden), and a new connection for each request.

    Against llama-server (cpp-httplib), a request sent on a kept-alive connection now and
    then failed to connect (APIConnectionError: one request of the 8-client run in two runs
    of ``make bench-llamacpp``, and the last of the shared-prompt questions in one; reproduced
    once in six runs of ``bench.prefix`` alone). cpp-httplib closes kept-alive connections on
    its own count and timers. A connection per request costs every server the same ~0.1 ms
    on localhost, and measures servers rather than that race."""
    import httpx
    import openai

    http = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_keepalive_connections=0))
    return openai.AsyncOpenAI(
        base_url=url, api_key="bench", max_retries=0, timeout=900, http_client=http
    )


async def _client(target: Target):
    client = openai_client(target.url)
    model = target.model
    if model is None:
        listed = (await client.models.list()).data
        model = listed[0].id if listed else "default"
    return client, model


async def run_clients(
    target: Target, work: list[WorkItem], clients: int, label: str = ""
) -> tuple[dict, list[RequestRecord]]:
    """``clients`` concurrent streaming clients share the workload; summary and records."""
    from tqdm.auto import tqdm

    client, model = await _client(target)
    queue: asyncio.Queue[tuple[int, WorkItem]] = asyncio.Queue()
    for pair in enumerate(work):
        queue.put_nowait(pair)
    records: list[RequestRecord | None] = [None] * len(work)
    bar = tqdm(total=len(work), desc=label or f"{target.name}: {clients} clients", unit="req")

    async def worker():
        while not queue.empty():
            index, item = queue.get_nowait()
            records[index] = await _one_request(client, model, item)
            bar.update()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    bar.close()
    await client.close()
    done = [r for r in records if r is not None]
    return summarize(done, wall), done


async def run_drop(
    target: Target, probe: WorkItem, *, streams: int, tokens: int, repeats: int = 3
) -> dict[str, Any]:
    """Latency of ``probe`` when idle, then right after ``streams`` long streams were dropped."""
    client, model = await _client(target)
    idle = [await _one_request(client, model, probe) for _ in range(repeats)]
    long = WorkItem(probe.prompt, tokens)
    dropped = await asyncio.gather(
        *(_one_request(client, model, long, drop_after_first=True) for _ in range(streams))
    )
    after = await _one_request(client, model, probe)
    await client.close()
    idle_latency = statistics.median(r.latency for r in idle)
    errors = [r.error for r in [*idle, *dropped, after] if r.error]
    return {
        "streams": streams,
        "tokens_asked": tokens,
        "dropped_first_token_p50_s": percentile(
            [r.ttft for r in dropped if r.ttft is not None], 50
        ),
        "idle_latency_s": idle_latency,
        "after_drop_latency_s": after.latency,
        "ratio": after.latency / idle_latency if idle_latency else None,
        "probe_tokens": after.output_tokens,
        "errors": errors[:5],
    }


# ------------------------------------------------------------------ in-process baselines


def run_baselines(
    model_dir: str,
    work: list[WorkItem],
    batch: int,
    threads: int | None,
    *,
    static: bool = True,
) -> dict[str, tuple[dict, list[RequestRecord]]]:
    """(a) sequential ``model.generate``; (b) static batches of ``batch``, left-padded."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)

    def prompt_ids(item: WorkItem) -> list[int]:
        text = tokenizer.apply_chat_template(
            messages_for(item), add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def generated(row: torch.Tensor, limit: int) -> int:
        """Tokens up to and including the first EOS, at most ``limit``."""
        for n, token in enumerate(row.tolist()[:limit], start=1):
            if token in eos_ids:
                return n
        return min(limit, row.shape[0])

    results = {}
    with torch.inference_mode():
        model.generate(torch.tensor([prompt_ids(work[0])]), max_new_tokens=2, do_sample=False)
        records, start = [], time.perf_counter()
        for item in tqdm(work, desc="baseline: sequential generate", unit="req"):
            t0 = time.perf_counter()
            ids = torch.tensor([prompt_ids(item)])
            out = model.generate(ids, max_new_tokens=item.max_tokens, do_sample=False)
            n = generated(out[0, ids.shape[1] :], item.max_tokens)
            records.append(
                RequestRecord(latency=time.perf_counter() - t0, ttft=None, output_tokens=n)
            )
        results["sequential_generate"] = (summarize(records, time.perf_counter() - start), records)
        if not static:
            return results

        records, start = [], time.perf_counter()
        for i in tqdm(
            range(0, len(work), batch), desc=f"baseline: static batch {batch}", unit="batch"
        ):
            group = work[i : i + batch]
            t0 = time.perf_counter()
            enc = tokenizer.pad({"input_ids": [prompt_ids(w) for w in group]}, return_tensors="pt")
            out = model.generate(
                **enc, max_new_tokens=max(w.max_tokens for w in group), do_sample=False,
                pad_token_id=pad,
            )  # fmt: skip
            took = time.perf_counter() - t0
            for row, w in zip(out[:, enc["input_ids"].shape[1] :], group, strict=True):
                records.append(
                    RequestRecord(
                        latency=took, ttft=None, output_tokens=generated(row, w.max_tokens)
                    )
                )
        name = f"static_batch_{batch}_generate"
        results[name] = (summarize(records, time.perf_counter() - start), records)
    return results


def latency_ratio(served: list[RequestRecord], local: list[RequestRecord]) -> dict[str, Any]:
    """Served over in-process latency, summed over the requests that produced the same number
    of tokens both ways (the same greedy answer, so the same work)."""
    pairs = [
        (s, b)
        for s, b in zip(served, local, strict=False)
        if s.error is None and s.output_tokens == b.output_tokens
    ]
    served_s = sum(s.latency for s, _ in pairs)
    local_s = sum(b.latency for _, b in pairs)
    return {
        "requests_compared": len(pairs),
        "requests_differing": len(served) - len(pairs),
        "served_latency_s": served_s,
        "generate_latency_s": local_s,
        "ratio": served_s / local_s if local_s else None,
    }


# ------------------------------------------------------------------ report


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


COLUMNS = [
    "requests", "errors", "output_tokens", "output_tokens_per_s", "ttft_p50_s", "ttft_p95_s",
    "itl_p50_s", "itl_p95_s", "latency_p50_s", "latency_p95_s",
]  # fmt: skip


def table(results: dict[str, dict], columns: list[str] = COLUMNS) -> str:
    rows = [[name] + [_fmt(r.get(c)) for c in columns] for name, r in results.items()]
    header = ["run", *columns]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    return "\n".join(
        "  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    )


def write_json(path: str | Path, payload: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    return out


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload and scenario sizes, the same for ``bench.serving`` and ``bench.suite``."""
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--latency-requests", type=int, default=8)
    parser.add_argument("--drop-streams", type=int, default=16)
    parser.add_argument("--drop-tokens", type=int, default=1000)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", action="append", default=[], help="[NAME=]URL[#MODEL] (repeatable)"
    )
    parser.add_argument(
        "--scenario", action="append", choices=["throughput", "latency", "drop"], default=[]
    )
    add_workload_arguments(parser)
    parser.add_argument("--baselines", metavar="MODEL_DIR", help="also run in-process generate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for baselines")
    parser.add_argument("--out", default="bench-results/serving.json")
    args = parser.parse_args(argv)
    scenarios = args.scenario or ["throughput"]

    work = make_workload(
        args.requests, min_tokens=args.min_tokens, max_tokens=args.max_tokens, seed=args.seed
    )
    results: dict[str, dict] = {}
    records: dict[str, list[RequestRecord]] = {}
    drops: dict[str, dict] = {}
    for target in map(Target.parse, args.url):
        if "throughput" in scenarios:
            name = f"{target.name} ({args.clients} clients)"
            results[name], records[name] = asyncio.run(run_clients(target, work, args.clients))
        if "latency" in scenarios:
            name = f"{target.name} (1 client)"
            subset = work[: args.latency_requests]
            results[name], records[name] = asyncio.run(run_clients(target, subset, 1))
        if "drop" in scenarios:
            drops[target.name] = asyncio.run(
                run_drop(target, work[0], streams=args.drop_streams, tokens=args.drop_tokens)
            )
    if args.baselines:
        for name, (summary, recs) in run_baselines(
            args.baselines, work, args.clients, args.threads
        ).items():
            results[name], records[name] = summary, recs
    print(table(results))
    ratios = {}
    if "sequential_generate" in records:
        local = records["sequential_generate"]
        for name in [n for n in records if n.endswith("(1 client)")]:
            ratios[name] = latency_ratio(records[name], local)
            print(f"{name}: latency / in-process generate = {_fmt(ratios[name]['ratio'])}")
    for name, drop in drops.items():
        print(f"{name}: after {drop['streams']} dropped streams, latency x{_fmt(drop['ratio'])}")
    errors = {n: [r.error for r in recs if r.error][:5] for n, recs in records.items()}
    for name, errs in errors.items():
        for err in errs:
            print(f"error in {name}: {err}")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    out = write_json(
        args.out,
        {
            "config": config,
            "workload": [asdict(w) for w in work],
            "results": results,
            "latency_vs_generate": ratios,
            "drop": drops,
        },
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
