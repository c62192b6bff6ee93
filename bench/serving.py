"""Serving benchmark: N concurrent streaming clients against any OpenAI-compatible URL.

    python -m bench.serving --url http://localhost:3000/v1 --clients 8 --requests 32
    python -m bench.serving --url http://localhost:8000/v1 --model MODEL_DIR   # a peer server
    python -m bench.serving --baselines ~/bentoml/models/smollm2-135m-instruct/latest

Every request streams with ``stream_options.include_usage`` and greedy decoding. The
workload (mixed prompt and output lengths, seeded) is the same for every target, so runs
against different servers compare. ``--baselines`` also runs the same workload in process
with plain ``model.generate``: one request at a time, and in static batches of
``--clients``. Prints a table and writes every figure to a JSON file.
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

TOPICS = [
    "the water cycle", "how a bicycle works", "the history of Paris", "photosynthesis",
    "why the sky is blue", "how to bake bread", "the planets of the solar system",
    "the rules of chess", "how vaccines work", "the French revolution",
]  # fmt: skip


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


async def _one_request(client, model: str, item: WorkItem) -> RequestRecord:
    start = time.perf_counter()
    record = RequestRecord(latency=0.0, ttft=None)
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": item.prompt}],
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
            if chunk.usage is not None:
                record.output_tokens = chunk.usage.completion_tokens
        if not record.output_tokens:
            record.output_tokens = len(record.token_times)
    except Exception as exc:  # a benchmark reports failures, it does not stop on them
        record.error = f"{type(exc).__name__}: {exc}"
    record.latency = time.perf_counter() - start
    return record


async def run_server(url: str, model: str | None, work: list[WorkItem], clients: int):
    import openai
    from tqdm.auto import tqdm

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    if model is None:
        model = (await client.models.list()).data[0].id
    queue: asyncio.Queue[WorkItem] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    records: list[RequestRecord] = []
    bar = tqdm(total=len(work), desc=f"{clients} clients -> {url}", unit="req")

    async def worker():
        while not queue.empty():
            records.append(await _one_request(client, model, queue.get_nowait()))
            bar.update()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    bar.close()
    await client.close()
    return summarize(records, wall), [r.error for r in records if r.error][:5]


# ------------------------------------------------------------------ in-process baselines


def run_baselines(model_dir: str, work: list[WorkItem], batch: int, threads: int | None):
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def prompt_ids(item: WorkItem) -> list[int]:
        messages = [{"role": "user", "content": item.prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def generated(row: torch.Tensor, limit: int) -> int:
        """Tokens up to and including the first EOS, at most ``limit``."""
        ids = row.tolist()[:limit]
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        for n, token in enumerate(ids, start=1):
            if token in eos_ids:
                return n
        return len(ids)

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
        results["sequential_generate"] = summarize(records, time.perf_counter() - start)

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
        results[f"static_batch_{batch}_generate"] = summarize(records, time.perf_counter() - start)
    return results


# ------------------------------------------------------------------ report


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def print_table(results: dict[str, dict]) -> None:
    columns = [
        "requests", "errors", "output_tokens", "output_tokens_per_s", "ttft_p50_s", "ttft_p95_s",
        "itl_p50_s", "itl_p95_s", "latency_p50_s", "latency_p95_s",
    ]  # fmt: skip
    rows = [[name] + [_fmt(r[c]) for c in columns] for name, r in results.items()]
    header = ["target", *columns]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", action="append", default=[], help="OpenAI base URL (repeatable)")
    parser.add_argument("--model", default=None, help="model id to send (default: first listed)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baselines", metavar="MODEL_DIR", help="also run in-process generate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for baselines")
    parser.add_argument("--out", default="bench-results/serving.json")
    args = parser.parse_args(argv)

    work = make_workload(
        args.requests, min_tokens=args.min_tokens, max_tokens=args.max_tokens, seed=args.seed
    )
    results: dict[str, dict] = {}
    errors: dict[str, list] = {}
    for url in args.url:
        results[url], errors[url] = asyncio.run(run_server(url, args.model, work, args.clients))
    if args.baselines:
        results.update(run_baselines(args.baselines, work, args.clients, args.threads))
    print_table(results)
    for url, errs in errors.items():
        for err in errs:
            print(f"error from {url}: {err}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(
        json.dumps(
            {"config": config, "workload": [asdict(w) for w in work], "results": results}, indent=2
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
