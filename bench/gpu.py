"""The engine on a GPU against transformers' own continuous batching, in one process.

    python -m bench.gpu --out-dir docs/gpu            # on the GPU machine (make gpu-check)
    python -m bench.gpu --smoke --device cpu          # a tiny model: checks the script runs

Needs torch and transformers only (the borrowed GPU machine has no bentoml, no vLLM and no
network): the model is built from a config with random weights, Llama-3-8B-sized, in bf16,
straight on the device. Random weights decode random tokens; no request stops early (no
stop ids, EOS ignored), so both engines produce exactly the same number of tokens.

1. Our engine (``GenerationEngine`` with its ``PagedLlama`` batch model, the runner's own
   code): ``--concurrency`` requests in flight at once, ``--requests`` in all, prompts of
   ``--prompt-min``..``--prompt-max`` random tokens, ``--new-tokens`` each. Output tok/s,
   TTFT and per-step figures from the engine's counters.
2. Step times of the batch model alone at a grid of decode rows and prefill tokens (the
   latency model a simulated accelerator can take).
3. The anchor: transformers' ``generate_batch`` (continuous batching, paged attention) on
   the same model object, the same prompts, at most ``--concurrency`` requests per batch.

Writes ``results.json`` and ``report.md`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from contract.tokens import SamplingParams
from runners.batch_model import Work, build_batch_model
from runners.engine import GenerationEngine, kv_budget_bytes

# Llama-3-8B's shape (meta-llama/Meta-Llama-3-8B config.json).
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
)  # fmt: skip


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """Random weights, made on the device in ``dtype`` (no host copy of 16 GB)."""
    config = transformers.LlamaConfig(**shape, bos_token_id=None, eos_token_id=None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for parameter in model.parameters():  # small weights: activations stay in range
        parameter.data.normal_(0.0, 0.02)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def workload(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    return [
        [rng.randrange(vocab) for _ in range(rng.randint(args.prompt_min, args.prompt_max))]
        for _ in range(args.requests)
    ]


async def run_ours(engine: GenerationEngine, prompts: list[list[int]], args) -> dict[str, Any]:
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    gate = asyncio.Semaphore(args.concurrency)
    ttfts, tokens = [], 0

    async def one(prompt: list[int]) -> None:
        nonlocal tokens
        async with gate:
            start, first = time.perf_counter(), None
            async for chunk in engine.stream(prompt, params):
                first = first or time.perf_counter() - start
                tokens += len(chunk.token_ids)
            ttfts.append(first)

    stats = engine.stats
    steps, busy = stats.steps, stats.busy_seconds
    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - start
    steps, busy = stats.steps - steps, stats.busy_seconds - busy
    return {
        "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttfts), "steps": steps,
        "step_ms_mean": 1e3 * busy / steps if steps else None,
        "busy_fraction": busy / wall,
    }  # fmt: skip


def step_grid(engine: GenerationEngine, device: torch.device, args) -> list[dict[str, Any]]:
    """Forward time of one step: decode at ``rows`` x ``context``, and prefill chunks."""
    model = engine.batch_model
    size = model.block_size
    grid = []
    cases = [("decode", rows, args.grid_context) for rows in args.grid_rows]
    cases += [("prefill", 1, tokens) for tokens in args.grid_prefill]
    for kind, rows, length in cases:
        blocks_each = -(-(length + 1) // size)
        if rows * blocks_each >= model.num_blocks:
            continue
        tables = [tuple(range(1 + r * blocks_each, 1 + (r + 1) * blocks_each)) for r in range(rows)]
        if kind == "decode":
            work = [Work(r, [r + 1], length, blocks=tables[r]) for r in range(rows)]
        else:
            work = [Work(0, list(range(length)), 0, blocks=tables[0])]
        times = []
        for repeat in range(args.grid_repeats + 1):
            sync(device)
            started = time.perf_counter()
            model.forward(work)
            sync(device)
            if repeat:  # the first is a warm-up
                times.append(time.perf_counter() - started)
        tokens = rows if kind == "decode" else length
        grid.append({"kind": kind, "rows": rows, "context": length, "tokens": tokens,
                     "step_ms": 1e3 * statistics.median(times)})  # fmt: skip
    return grid


def run_transformers(model, prompts: list[list[int]], args) -> dict[str, Any]:
    """transformers' continuous batching (``generate_batch``) on the same model."""
    config = transformers.GenerationConfig(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    options: dict[str, Any] = {"generation_config": config}
    parameters = inspect.signature(model.generate_batch).parameters
    if "continuous_batching_config" in parameters:  # transformers >= 5.2x
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        options["continuous_batching_config"] = ContinuousBatchingConfig(
            max_requests_per_batch=args.concurrency
        )
    else:  # older: the batching settings live on the generation config
        config.max_batch_tokens = None
        config.scheduler = "fifo"
    if "progress_bar" in parameters:
        options["progress_bar"] = False
    model.generate_batch(inputs=prompts[: min(4, len(prompts))], **options)  # warm-up
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, **options)
    wall = time.perf_counter() - start
    tokens = sum(len(out.generated_tokens) for out in outputs.values())
    return {"output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and workload")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--prompt-min", type=int, default=64)
    parser.add_argument("--prompt-max", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--kv-cache-gib", type=float, default=None)
    parser.add_argument("--grid-rows", type=int, nargs="*", default=[1, 8, 32, 64, 128])
    parser.add_argument("--grid-context", type=int, default=512)
    parser.add_argument("--grid-prefill", type=int, nargs="*", default=[512, 2048, 8192])
    parser.add_argument("--grid-repeats", type=int, default=5)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="docs/gpu")
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.requests, args.new_tokens = 4, 8, 8
        args.prompt_min, args.prompt_max, args.max_batch_size = 8, 40, 8
        args.grid_rows, args.grid_context, args.grid_prefill = [1, 4], 32, [64]
        args.grid_repeats, args.kv_cache_gib = 1, args.kv_cache_gib or 0.01

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" or not args.smoke else torch.float32
    shape = TINY if args.smoke else LLAMA3_8B
    started = time.perf_counter()
    model = build_model(shape, device, dtype)
    built_s = time.perf_counter() - started
    prompts = workload(args, shape["vocab_size"])

    def build():
        return build_batch_model(
            model, backend="paged", max_slots=args.max_batch_size,
            context_length=shape["max_position_embeddings"],
            kv_budget_bytes=kv_budget_bytes(device, args.kv_cache_gib, None),
        )  # fmt: skip

    engine = GenerationEngine(
        build, device, max_batch_size=args.max_batch_size,
        max_batch_tokens=8192 if device.type == "cuda" else 512,
        max_in_flight=args.requests,
    )  # fmt: skip
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": "Llama-3-8B shape, random weights" if not args.smoke else "tiny (smoke)",
        "dtype": str(dtype).removeprefix("torch."),
        "config": vars(args),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "model_build_s": built_s,
        "kv_blocks": engine.blocks.num_blocks,
        "kv_block_tokens": engine.blocks.block_size,
    }
    asyncio.run(run_ours(engine, prompts[: args.concurrency], args))  # warm-up
    results["ours"] = asyncio.run(run_ours(engine, prompts, args))
    print("ours:", json.dumps(results["ours"]))
    results["step_grid"] = step_grid(engine, device, args)
    print("step grid:", json.dumps(results["step_grid"]))
    engine.close()
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_transformers:
        try:
            results["transformers"] = run_transformers(model, prompts, args)
            print("transformers generate_batch:", json.dumps(results["transformers"]))
        except Exception as exc:  # noqa: BLE001 - the report says what failed
            results["transformers"] = {"error": f"{type(exc).__name__}: {exc}"}
            print("transformers generate_batch failed:", exc)
    anchor = results.get("transformers", {}).get("output_tokens_per_s")
    ratio = results["ours"]["output_tokens_per_s"] / anchor if anchor else None
    results["ratio_vs_transformers"] = ratio
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(report(results))
    print(f"ours / transformers generate_batch: {ratio}; wrote {out}/report.md")
    return 0


def report(results: dict[str, Any]) -> str:
    ours, theirs = results["ours"], results.get("transformers", {})
    config = results["config"]
    ratio = results["ratio_vs_transformers"]
    lines = [
        "# The native engine on a GPU (`make gpu-check`)",
        "",
        f"Device: {results['device']}; model: {results['model']}, {results['dtype']}; "
        f"versions: {results['versions']}.",
        f"Workload: {config['requests']} requests, {config['concurrency']} at a time, prompts "
        f"of {config['prompt_min']}-{config['prompt_max']} random tokens, "
        f"{config['new_tokens']} new tokens each (no early stops).",
        "",
        "| | output tok/s | wall s | TTFT p50 s | mean step ms | busy |",
        "|---|---|---|---|---|---|",
        f"| ours (GenerationEngine, PagedLlama) | {ours['output_tokens_per_s']:.0f} | "
        f"{ours['wall_s']:.1f} | {ours['ttft_p50_s']:.3f} | {ours['step_ms_mean']:.1f} | "
        f"{ours['busy_fraction']:.2f} |",
    ]
    if "output_tokens_per_s" in theirs:
        lines.append(f"| transformers generate_batch | {theirs['output_tokens_per_s']:.0f} | "
                     f"{theirs['wall_s']:.1f} | | | |")  # fmt: skip
    else:
        lines.append(f"| transformers generate_batch | {theirs.get('error', 'not run')} | | | | |")
    ratio_text = f"{ratio:.2f}x" if ratio else "not measured"
    lines += [
        "",
        f"Ours / transformers: **{ratio_text}** (target: >= 1.5x at 64 concurrent).",
        "",
        "## Step times of the batch model alone",
        "",
        "| kind | rows | context or prompt tokens | step ms |",
        "|---|---|---|---|",
        *(
            f"| {g['kind']} | {g['rows']} | {g['context']} | {g['step_ms']:.2f} |"
            for g in results["step_grid"]
        ),  # fmt: skip
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
