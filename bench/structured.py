"""What structured outputs cost the native engine: grammar compile time, and throughput.

    python -m bench.structured                  # the default model from the BentoML store

1. Compile time of each schema of tests/e2e/test_structured (pydantic models, as the openai
   SDK sends them): cold (the first time) and cached (the same schema again).
2. Throughput at ``--clients`` concurrent requests, in process, greedy, ``--tokens`` each:
   free text against the same requests constrained to a JSON schema with one long string
   (so both run to the same length and the difference is the masking, not shorter answers).
3. What the closing guard (runners/closing.py) costs structured requests: the same engine with
   it on and off, on a story the model writes to its budget (closed there when on, cut when
   off) and on the long string (which no close fits: the guard looks, and lets it be cut).
   Free text
   never meets the guard (it is built for constrained requests only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from contract.tokens import SamplingParams, StructuredOutput
from runners.engine import GenerationEngine
from runners.settings import ClosingOptions

# A string at least this long: constrained answers run to max_tokens as free ones do.
LONG = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
}
# A story the model writes on past its minimum, to its budget: the guard closes it there
# (measured: every answer at 96 tokens), and without it the answer is cut at the same length.
STORY = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 120}},
    "required": ["story"],
}
PROMPTS = [
    "Write a long story about a lighthouse keeper.", "Tell me everything about bread.",
    "Describe a long journey by train.", "Write a long essay about chess.",
]  # fmt: skip


def compile_times(engine: GenerationEngine) -> list[dict]:
    from openai.lib._pydantic import to_strict_json_schema

    from tests.e2e.test_structured import CASES

    grammars = engine._get_grammars()
    started = time.perf_counter()
    grammars.compile(StructuredOutput(kind="json_object"))  # loads the tokenizer's vocabulary
    found = [{"schema": "(first use: tokenizer info, json_object)",
              "cold_ms": 1e3 * (time.perf_counter() - started), "cached_ms": None}]  # fmt: skip
    for model, _ in CASES:
        spec = StructuredOutput(
            kind="json_schema", json_schema=json.dumps(to_strict_json_schema(model))
        )
        found.append(_compile_twice(grammars, model.__name__, spec))
    # Tool calls: the structural tag for the three tools of tests/e2e/test_tools, per mode.
    for choice in ("auto", "required"):
        found.append(_compile_twice(grammars, f"tools ({choice})", tools_spec(choice)))
    return found


def _compile_twice(grammars, name: str, spec: StructuredOutput) -> dict:
    """``spec`` compiled cold, then again from the cache, in milliseconds."""
    times = []
    for _ in range(2):
        started = time.perf_counter()
        grammars.compile(spec)
        times.append(time.perf_counter() - started)
    return {"schema": name, "cold_ms": 1e3 * times[0], "cached_ms": 1e3 * times[1]}


def tools_spec(choice: str) -> StructuredOutput:
    """The constraint for ``tool_choice`` ``choice`` over the three tools of
    tests/e2e/test_tools (``auto``: free text until ``<tool_call>``)."""
    from logic.protocol import ChatCompletionRequest
    from logic.tools import plan_tools
    from logic.tools import structured_output as tool_spec
    from tests.e2e.test_tools import TOOLS

    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": choice}
    )
    return tool_spec(plan_tools(request, native=False))


async def throughput(
    engine, tokenizer, clients: int, tokens: int, spec: StructuredOutput | None
) -> dict:
    requests = []
    for index in range(clients * 2):
        prompt = PROMPTS[index % len(PROMPTS)]
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True)  # fmt: skip
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        requests.append(ids)
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, structured=spec)
    gate, produced = asyncio.Semaphore(clients), 0

    async def one(ids):
        nonlocal produced
        async with gate:
            async for chunk in engine.stream(ids, params):
                produced += len(chunk.token_ids)

    steps, busy = engine.stats.steps, engine.stats.busy_seconds
    started = time.perf_counter()
    await asyncio.gather(*(one(ids) for ids in requests))
    wall = time.perf_counter() - started
    steps, busy = engine.stats.steps - steps, engine.stats.busy_seconds - busy
    return {"output_tokens": produced, "wall_s": wall, "output_tokens_per_s": produced / wall,
            "step_ms": 1e3 * busy / steps}  # fmt: skip


NO_FIT = {  # a minimum no budget here reaches: the guard looks, pauses, and lets it be cut
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 100000}},
    "required": ["story"],
}


def guard_cpu_cost(engine, tokenizer, tokens: int) -> dict:
    """The guard's own time per token (microseconds), on one answer's tokens replayed into it,
    against the grammar's token acceptance alone: exact where the throughput ratio is noise."""

    grammars = engine._get_grammars()
    text = '{"story":"' + "Once upon a time a lighthouse keeper lit the lamp each night. " * 40
    ids = tokenizer.encode(text)[:tokens]
    found = {}
    for name, schema in (("closed at its budget", STORY), ("no close fits", NO_FIT)):
        spec = StructuredOutput(kind="json_schema", json_schema=json.dumps(schema))
        times = {}
        for with_guard in (True, False):
            started, runs = time.perf_counter(), 10
            for _ in range(runs):
                constraint = asyncio.run(grammars.matcher(spec, []))
                if with_guard:
                    guard = grammars.guard_on(constraint, budget=tokens,
                                              options=ClosingOptions(True, 48))  # fmt: skip
                    for token in ids:
                        if guard.step(token).way is not None:
                            break
                else:
                    for token in ids:
                        constraint.accept(token)
            times[with_guard] = 1e6 * (time.perf_counter() - started) / runs / len(ids)
        found[name] = {"guard_us_per_token": times[True], "accept_us_per_token": times[False]}
    return found


def closing_cost(engine, tokenizer, clients: int, tokens: int) -> dict:
    """Structured throughput with the closing guard on and off, alternated (on, off, on, off),
    the better of two runs each: the machine's noise is larger than the guard's cost."""
    story = StructuredOutput(kind="json_schema", json_schema=json.dumps(STORY))
    found = {}
    no_fit = StructuredOutput(kind="json_schema", json_schema=json.dumps(NO_FIT))
    for name, spec in (("closed at its budget", story), ("no close fits", no_fit)):
        runs: dict[bool, list] = {True: [], False: []}
        for _ in range(2):
            for on in (True, False):
                engine._closing = ClosingOptions(close=on, loop_tokens=48 if on else 0)
                before = engine.stats.closed_budget + engine.stats.closed_loop
                run = asyncio.run(throughput(engine, tokenizer, clients, tokens, spec))
                run["closed"] = engine.stats.closed_budget + engine.stats.closed_loop - before
                runs[on].append(run)
        found[name] = tuple(
            max(runs[on], key=lambda r: r["output_tokens_per_s"]) for on in (True, False)
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model store tag")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args(argv)
    import bentoml
    from transformers import AutoTokenizer

    path = bentoml.models.get(args.model).path
    engine = GenerationEngine.load(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        compiled = compile_times(engine)
        json_spec = StructuredOutput(kind="json_schema", json_schema=json.dumps(LONG))
        # Masking alone first: the guard would close the long string (its minLength filled
        # with the longest words) and change the lengths compared.
        engine._closing = ClosingOptions(close=False, loop_tokens=0)
        asyncio.run(throughput(engine, tokenizer, args.clients, 8, None))  # warm-up
        free = asyncio.run(throughput(engine, tokenizer, args.clients, args.tokens, None))
        constrained = asyncio.run(
            throughput(engine, tokenizer, args.clients, args.tokens, json_spec)
        )
        tools = asyncio.run(
            throughput(engine, tokenizer, args.clients, args.tokens, tools_spec("auto"))
        )
        guard = closing_cost(engine, tokenizer, args.clients, args.tokens)
        per_token = guard_cpu_cost(engine, tokenizer, args.tokens)
    finally:
        engine.close()
    print(f"first use (the tokenizer's vocabulary): {compiled[0]['cold_ms']:.0f} ms")
    schemas = [c for c in compiled[1:] if not c["schema"].startswith("tools")]
    cold = [c["cold_ms"] for c in schemas]
    cached = [c["cached_ms"] for c in schemas]
    print(f"compile, {len(cold)} schemas: cold median {statistics.median(cold):.1f} ms "
          f"(max {max(cold):.1f}), cached median {statistics.median(cached):.2f} ms")  # fmt: skip
    for tag in (c for c in compiled if c["schema"].startswith("tools")):
        print(f"compile, {tag['schema']}, 3 tools: cold {tag['cold_ms']:.1f} ms, "
              f"cached {tag['cached_ms']:.2f} ms")  # fmt: skip
    for name, run in (("free", free), ("constrained", constrained), ("tools auto", tools)):
        print(f"{name:>12}: {run['output_tokens_per_s']:.1f} tok/s, {run['output_tokens']} "
              f"tokens, step {run['step_ms']:.1f} ms")  # fmt: skip
    ratio = constrained["output_tokens_per_s"] / free["output_tokens_per_s"]
    print(f"constrained / free throughput at {args.clients} concurrent: {ratio:.2f} "
          f"(cost {100 * (1 - ratio):.0f}%; target <= 15%)")  # fmt: skip
    ratio = tools["output_tokens_per_s"] / free["output_tokens_per_s"]
    print(f"tools auto (answered in text) / free throughput: {ratio:.2f} "
          f"(cost {100 * (1 - ratio):.0f}%)")  # fmt: skip
    for name, (on, off) in guard.items():
        ratio = on["output_tokens_per_s"] / off["output_tokens_per_s"]
        print(f"closing guard on / off, {name}: {ratio:.3f} ({on['output_tokens_per_s']:.1f} "
              f"against {off['output_tokens_per_s']:.1f} tok/s; step {on['step_ms']:.1f} "
              f"against {off['step_ms']:.1f} ms; closed {on['closed']})")  # fmt: skip
    step_ms = guard["closed at its budget"][1]["step_ms"]
    for name, cost in per_token.items():
        extra = cost["guard_us_per_token"] - cost["accept_us_per_token"]
        print(f"closing guard's own time, {name}: {cost['guard_us_per_token']:.0f} us a token "
              f"(the grammar's acceptance alone {cost['accept_us_per_token']:.0f} us): at "
              f"{args.clients} concurrent, {100 * extra * args.clients / 1e3 / step_ms:.1f}% "
              f"of a {step_ms:.0f} ms step")  # fmt: skip
    print(json.dumps({"compile": compiled, "free": free, "constrained": constrained,
                      "tools_auto": tools, "closing_guard": guard,
                      "closing_guard_cpu": per_token}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
