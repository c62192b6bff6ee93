"""Monolith or microservices, measured: the same workload against each topology.

    make bench-topology                       # the committed report's settings
    python -m bench.topology --clients 1,4,16 --logic-ms 0,20 --api-workers 2 \\
        --topologies monolith,split,remote --out docs/topology

For each business-logic weight and topology it starts the server(s) from this tree, warms
them up, then for each number of concurrent clients runs the same seeded streaming workload
(bench.serving) and reads: throughput, request latency and time to first token p50/p95, the
model's busy fraction (``llm_runner_busy_seconds_total`` over the run), the peak memory of
the API workers and of the model's process, and the cost per million output tokens at the
prices in ``--prices``. Writes report.md, results.json and PNG plots to ``--out`` and prints
a summary. One server runs at a time, so none steals CPU from another.

Topologies: ``monolith`` (``bentoml serve service:Monolith``: API and engine in one
process), ``split`` (``bentoml serve service:ChatAPI``: API workers and the runner, one
host), ``remote`` (the runner and the API as two servers, the API pointed at the runner's
URL with ``--depends``, as on two hosts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import psutil

from bench.report import TOPOLOGIES, Prices, Row, busy_fraction, make_row, markdown, plot
from bench.report import summary as summarize_rows
from bench.serving import Target, WorkItem, make_workload, run_clients
from bench.suite import server

BENTOML = str(Path(sys.executable).with_name("bentoml"))
START = [sys.executable, "-m", "bentoml_cli._internal.start", "start-http-server"]
_BUSY = re.compile(r"^llm_runner_busy_seconds_total\s+(\S+)", re.MULTILINE)
# A simulated accelerator reports its own busy time: the share it computed, not the host's.
_DEVICE_BUSY = re.compile(r"^llm_runner_device_busy_seconds_total\s+(\S+)", re.MULTILINE)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def read_busy(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        page = response.read().decode()
    found = _DEVICE_BUSY.search(page) or _BUSY.search(page)
    if found is None:
        raise RuntimeError(f"no llm_runner_busy_seconds_total at {metrics_url}")
    return float(found.group(1))


class MemorySampler:
    """Peak RSS, every 0.25 s, of the API workers and of the model's process."""

    def __init__(self, roots: list[psutil.Process]):
        self.roots = roots
        self.api_peak = 0
        self.model_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        api = model = 0
        for root in self.roots:
            for process in root.children(recursive=True):
                try:
                    args = process.cmdline()
                    rss = process.memory_info().rss
                except psutil.Error:
                    continue
                if "--service-name" not in args:
                    continue
                name = args[args.index("--service-name") + 1]
                if name in ("LLMRunner", "Monolith"):
                    model += rss
                elif name == "ChatAPI":
                    api += rss
        self.api_peak = max(self.api_peak, api)
        self.model_peak = max(self.model_peak, model)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@contextmanager
def serve(topology: str, env: dict[str, str], port: int, logs: Path) -> Iterator[dict]:
    """The topology's server(s), ready; yields its URLs and process roots."""
    with ExitStack() as stack:
        url = f"http://127.0.0.1:{port}"
        if topology == "remote":
            runner_port = port + 1
            runner_url = f"http://127.0.0.1:{runner_port}"
            runner_cmd = [*START, "service:ChatAPI", "--service-name", "LLMRunner",
                          "--port", str(runner_port)]  # fmt: skip
            runner = stack.enter_context(
                server(runner_cmd, f"{runner_url}/readyz", logs / "remote-runner.log", env)
            )
            api_cmd = [*START, "service:ChatAPI", "--depends", f"LLMRunner={runner_url}",
                       "--port", str(port)]  # fmt: skip
            api = stack.enter_context(
                server(api_cmd, f"{url}/readyz", logs / "remote-api.log", env)
            )
            roots = [psutil.Process(runner.pid), psutil.Process(api.pid)]
            yield {"url": url, "metrics": f"{runner_url}/metrics", "roots": roots}
            return
        service = "service:Monolith" if topology == "monolith" else "service:ChatAPI"
        cmd = [BENTOML, "serve", service, "--port", str(port)]
        proc = stack.enter_context(server(cmd, f"{url}/readyz", logs / f"{topology}.log", env))
        # One serve: the monolith's engine, or the runner beside the API, is on its /metrics.
        yield {"url": url, "metrics": f"{url}/metrics", "roots": [psutil.Process(proc.pid)]}


def measure(args: argparse.Namespace) -> list[Row]:
    prices = Prices.load(args.prices)

    def workload(clients: int) -> list[WorkItem]:
        """The seeded workload; longer with more clients when --per-client asks for it."""
        return make_workload(
            max(args.requests, args.per_client * clients),
            min_tokens=args.min_tokens, max_tokens=args.max_tokens, seed=args.seed,
        )  # fmt: skip

    logs = Path(args.out) / "logs"
    rows: list[Row] = []
    for logic_ms in args.logic_ms:
        env = {
            "BENTOML_DO_NOT_TRACK": "true",
            "LLM_API_WORKERS": str(args.api_workers),
            "LLM_STEP_MODULES": "bench.steps",
            "LLM_PRE_STEPS": "system_prompt,input_limits,simulated_work",
            "LLM_ANSWER_STEPS": "simulated_answer_work",
            "BENCH_LOGIC_MS": str(logic_ms * (1 - args.post_share)),
            "BENCH_POST_MS": str(logic_ms * args.post_share),
            "LLM_LOG_LEVEL": "WARNING",  # a line per request would be measured too
        }
        if args.device == "simulated":
            env["LLM_DEVICE"] = "simulated"
            env["LLM_SIMULATED_ANSWER_TOKENS"] = str(4 * args.max_tokens)  # max_tokens ends
        if args.model:
            env["LLM_MODEL"] = args.model
        for topology in args.topologies:
            with serve(topology, env, args.port, logs) as served:
                target = Target(topology, f"{served['url']}/v1")
                warm = [WorkItem("Say hello.", 8)] * max(args.clients)
                asyncio.run(run_clients(target, warm, max(args.clients), f"{topology}: warm-up"))
                for clients in args.clients:
                    before = read_busy(served["metrics"])
                    with MemorySampler(served["roots"]) as memory:
                        label = f"{topology}, logic {logic_ms:g} ms, {clients} clients"
                        result, _ = asyncio.run(
                            run_clients(target, workload(clients), clients, label)
                        )
                    after = read_busy(served["metrics"])
                    api_mib = memory.api_peak / 2**20 if topology != "monolith" else None
                    row = make_row(
                        topology, logic_ms, clients, result,
                        busy=busy_fraction(before, after, result["wall_s"]),
                        api_rss_mib=api_mib, model_rss_mib=memory.model_peak / 2**20,
                        api_workers=args.api_workers, prices=prices,
                    )  # fmt: skip
                    rows.append(row)
                    print(
                        f"  {label}: {row.output_tokens_per_s:.1f} tok/s, busy "
                        f"{row.busy_fraction or 0:.0%}, errors {row.errors}",
                        flush=True,
                    )
    return rows


def write_report(rows: list[Row], args: argparse.Namespace, command: str) -> Path:
    device: dict = {}
    if args.device == "simulated":
        from runners.simulated import LLAMA3_8B_H100, describe

        device = {"device": f"simulated: {LLAMA3_8B_H100.name}",
                  "latency_model": describe(LLAMA3_8B_H100)}  # fmt: skip
    else:
        device = {"device": "cuda" if _has_cuda() else "cpu"}
    meta = {
        **device,
        "post_share": args.post_share,
        "command": command,
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU"
        if not _has_cuda()
        else f"{platform.machine()} with a GPU",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "model": args.model or os.environ.get("LLM_MODEL", "smollm2-135m-instruct"),
        "requests": args.requests
        if not args.per_client
        else f"max({args.requests}, {args.per_client} x clients)",
        "min_tokens": args.min_tokens,
        "max_tokens": args.max_tokens,
        "api_workers": args.api_workers,
        "logic_ms": args.logic_ms,
        "prices": Prices.load(args.prices),
        "prices_file": args.prices,
    }
    return render(rows, meta, Path(args.out))


def render(rows: list[Row], meta: dict, out: Path) -> Path:
    """report.md, the plots and results.json (everything needed to render them again)."""
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(rows, out)
    (out / "report.md").write_text(markdown(rows, meta, [str(p) for p in plots]))
    payload = {**meta, "prices": asdict(meta["prices"]), "rows": [r.as_dict() for r in rows]}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    return out / "report.md"


def rerender(results: Path) -> Path:
    """The report of an earlier run again, from its results.json (no new measurement)."""
    payload = json.loads(results.read_text())
    rows = [Row(**row) for row in payload.pop("rows")]
    payload["prices"] = Prices(**payload["prices"])
    return render(rows, payload, results.parent)


def _has_cuda() -> bool:
    return Path("/proc/driver/nvidia").exists()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--clients",
        type=_ints,
        default=[1, 4, 16],
        help="concurrent clients, comma-separated (default 1,4,16)",
    )
    parser.add_argument(
        "--logic-ms",
        type=_floats,
        default=[0.0, 20.0],
        help="business-logic CPU ms per request, comma-separated (default 0,20)",
    )
    parser.add_argument("--api-workers", type=int, default=2, help="API worker processes")
    parser.add_argument(
        "--device",
        choices=["auto", "simulated"],
        default="auto",
        help="simulated: the runner on the simulated GPU (LLM_DEVICE=simulated)",
    )
    parser.add_argument(
        "--post-share",
        type=float,
        default=0.0,
        help="the share of the logic weight spent on each complete answer's text (an "
        "answer step), the rest before the model (default 0: all before)",
    )
    parser.add_argument(
        "--topologies",
        type=lambda s: [t for t in s.split(",") if t],
        default=list(TOPOLOGIES),
        help="monolith,split,remote",
    )
    parser.add_argument("--requests", type=int, default=24, help="requests per point")
    parser.add_argument(
        "--per-client",
        type=int,
        default=0,
        help="at least this many requests per client at each point (0: --requests only)",
    )
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model store tag (default LLM_MODEL)")
    parser.add_argument("--prices", default="bench/prices.yaml")
    parser.add_argument("--port", type=int, default=3300)
    parser.add_argument("--out", default="docs/topology")
    parser.add_argument(
        "--rerender",
        metavar="RESULTS_JSON",
        help="only write the report again from a run's results",
    )
    args = parser.parse_args(argv)
    if args.rerender:
        print(f"report: {rerender(Path(args.rerender))}")
        return 0  # fmt: skip
    if not 0 <= args.post_share <= 1:
        parser.error("--post-share is a share: between 0 and 1")
    unknown = set(args.topologies) - set(TOPOLOGIES)
    if unknown:
        parser.error(f"unknown topologies: {', '.join(sorted(unknown))}")
    command = "python -m bench.topology " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.monotonic()
    rows = measure(args)
    report = write_report(rows, args, command.strip())
    print(f"\n{summarize_rows(rows)}\n\nreport: {report} ({time.monotonic() - started:.0f} s)")
    return 0 if not any(r.errors for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
