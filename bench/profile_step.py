"""Where one decode step's time goes: the native batch model alone, under torch's profiler.

    python -m bench.profile_step --rows 1 8 --context 120

Loads the model the runner serves (``--model``, from the BentoML store) as the runner does,
fills ``--rows`` sequences of ``--context`` tokens, then times decode steps (all rows at
once) and prints, per row count, the step time without the profiler and the top operators
with it. docs/engine-benchmark.md keeps the before and after of each change to the step.
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from runners.batch_model import Work
from runners.engine import GenerationEngine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model store tag")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=120)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)

    import bentoml

    engine = GenerationEngine.load(bentoml.models.get(args.model).path)
    model = engine.batch_model
    per_row = -(-(args.context + 1) // model.block_size)
    try:
        for rows in args.rows:
            tables = [tuple(range(1 + r * per_row, 1 + (r + 1) * per_row)) for r in range(rows)]
            prompt = list(range(5, 5 + args.context))
            model.forward([Work(r, prompt, 0, blocks=tables[r]) for r in range(rows)])
            work = [Work(r, [7], args.context, blocks=tables[r]) for r in range(rows)]
            for _ in range(5):
                model.forward(work)
            started = time.perf_counter()
            for _ in range(args.steps):
                model.forward(work)
            step_ms = (time.perf_counter() - started) / args.steps * 1e3
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    model.forward(work)
            print(f"\n{rows} row(s) at {args.context} tokens: {step_ms:.1f} ms per step "
                  f"({rows / step_ms * 1e3:.0f} tok/s); operators over 10 steps:")  # fmt: skip
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
