"""The whole engine benchmark in one command: start each server, measure, stop it.

    python -m bench.suite                      # ours (split) vs transformers serve, + baselines
    python -m bench.suite --skip-peer --requests 16

One server runs at a time, so none steals the CPU from another. In order:

1. ours: ``bentoml serve service:ChatAPI`` (``--service`` to pick another topology):
   warm-up, then ``--clients`` concurrent clients (throughput), one client (latency), and
   ``--drop-streams`` streams dropped after their first token (cancellation).
2. the peer: ``transformers serve MODEL_DIR --continuous-batching --device cpu``, warmed up
   with one request and then a full batch (its first batched call is slow), then the same
   throughput run.
3. in process, on the same workload: sequential ``model.generate`` and static batches.

Then it checks the issue's targets, prints a table, and writes JSON and Markdown reports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path

from bench.serving import (
    Target,
    WorkItem,
    add_workload_arguments,
    latency_ratio,
    make_workload,
    run_baselines,
    run_clients,
    run_drop,
    table,
    write_json,
)

TARGETS = {  # name: (what it compares, the bound, "min" or "max")
    "throughput_vs_peer": ("output tok/s, ours / transformers serve", 1.25, "min"),
    "throughput_vs_sequential": ("output tok/s, ours / sequential generate", 3.0, "min"),
    "latency_vs_generate": ("1-client latency, ours / in-process generate", 1.05, "max"),
    "latency_after_drop": ("latency after dropped streams / idle latency", 2.0, "max"),
}


def model_dir(tag: str) -> str:
    import bentoml

    return bentoml.models.get(tag).path


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def server(cmd: list[str], ready_url: str, log: Path, env: dict[str, str], timeout: float = 300):
    """Run ``cmd`` in its own process group until the block ends."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while not _ready(ready_url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not become ready; see {log}")
                time.sleep(1)
            yield proc
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def warm_up(target: Target, clients: int) -> None:
    """One request, then a full batch: first calls pay for lazy init, in any server."""
    short = [WorkItem("Say hello.", 16)]
    asyncio.run(run_clients(target, short, 1, label=f"{target.name}: warm-up"))
    asyncio.run(
        run_clients(target, short * clients, clients, label=f"{target.name}: warm-up batch")
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def check(value: float | None, bound: float, kind: str) -> str:
    if value is None:
        return "not measured"
    ok = value >= bound if kind == "min" else value <= bound
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model store tag")
    parser.add_argument("--service", default="service:ChatAPI")
    add_workload_arguments(parser)
    parser.add_argument("--port", type=int, default=3900)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-static", action="store_true", help="no static-batch baseline")
    parser.add_argument("--out", default="bench-results/suite")
    args = parser.parse_args(argv)

    directory = model_dir(args.model)
    work = make_workload(
        args.requests, min_tokens=args.min_tokens, max_tokens=args.max_tokens, seed=args.seed
    )
    logs = Path(args.out).parent / "logs"
    bin_dir = Path(sys.executable).parent
    results: dict[str, dict] = {}
    records: dict[str, list] = {}
    drop: dict | None = None

    ours = Target("ours", f"http://127.0.0.1:{args.port}/v1")
    cmd = [str(bin_dir / "bentoml"), "serve", args.service, "--port", str(args.port)]
    env = {"BENTOML_DO_NOT_TRACK": "true", "LLM_MODEL": args.model}
    with server(cmd, f"{ours.url}/models", logs / "ours.log", env):
        warm_up(ours, args.clients)
        name = f"ours ({args.clients} clients)"
        results[name], records[name] = asyncio.run(run_clients(ours, work, args.clients))
        subset = work[: args.latency_requests]
        results["ours (1 client)"], records["ours (1 client)"] = asyncio.run(
            run_clients(ours, subset, 1)
        )
        drop = asyncio.run(
            run_drop(ours, work[0], streams=args.drop_streams, tokens=args.drop_tokens)
        )

    peer_name = f"transformers serve ({args.clients} clients)"
    if not args.skip_peer:
        peer = Target("transformers serve", f"http://127.0.0.1:{args.port + 1}/v1", directory)
        cache = tempfile.mkdtemp(prefix="hf-cache-")
        cmd = [
            str(bin_dir / "transformers"), "serve", directory, "--continuous-batching",
            "--device", "cpu", "--host", "127.0.0.1", "--port", str(args.port + 1),
        ]  # fmt: skip
        env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache}
        try:
            with server(cmd, f"http://127.0.0.1:{args.port + 1}/health", logs / "peer.log", env):
                warm_up(peer, args.clients)
                results[peer_name], records[peer_name] = asyncio.run(
                    run_clients(peer, work, args.clients)
                )
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    baselines = run_baselines(directory, work, args.clients, None, static=not args.skip_static)
    for name, (summary, recs) in baselines.items():
        results[name], records[name] = summary, recs

    def tps(name: str) -> float | None:
        return results[name]["output_tokens_per_s"] if name in results else None

    ours_tps = tps(f"ours ({args.clients} clients)")
    latency = latency_ratio(records["ours (1 client)"], records["sequential_generate"])
    values = {
        "throughput_vs_peer": ours_tps / tps(peer_name) if tps(peer_name) else None,
        "throughput_vs_sequential": ours_tps / tps("sequential_generate"),
        "latency_vs_generate": latency["ratio"],
        "latency_after_drop": drop["ratio"] if drop else None,
    }
    checks = {
        key: {"what": what, "value": values[key], "bound": bound, "kind": kind,
              "verdict": check(values[key], bound, kind)}
        for key, (what, bound, kind) in TARGETS.items()
    }  # fmt: skip

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    report = [
        f"# Engine benchmark ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}. Model `{args.model}`, fp32, "
        f"greedy; {args.requests} requests, {args.min_tokens}-{args.max_tokens} output tokens.",
        "",
        "```",
        table(results),
        "```",
        "",
        "| target | value | bound | verdict |",
        "|---|---|---|---|",
        *[
            f"| {c['what']} | {_num(c['value'])} "
            f"| {'>=' if c['kind'] == 'min' else '<='} {c['bound']} | {c['verdict']} |"
            for c in checks.values()
        ],
        "",
        f"1-client latency compared on {latency['requests_compared']} requests with the same "
        f"output length ({latency['requests_differing']} differed). Drop: "
        f"{drop['streams'] if drop else '-'} streams of {args.drop_tokens} tokens; probe "
        f"{drop['idle_latency_s']:.2f} s idle, {drop['after_drop_latency_s']:.2f} s after.",
    ]
    text = "\n".join(report)
    print("\n" + text)
    write_json(
        f"{args.out}.json",
        {
            "config": vars(args),
            "machine": machine,
            "workload": [asdict(w) for w in work],
            "results": results,
            "latency_vs_generate": latency,
            "drop": drop,
            "targets": checks,
        },
    )
    Path(f"{args.out}.md").write_text(text + "\n")
    print(f"\nwrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
