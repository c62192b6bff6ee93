"""CPU each process (and thread) of a server spends per generated token, one client.

On a host where the model shares its cores with the serving processes, the CPU those take
per token is what they take from the model's threads. This sends ``--requests`` streamed
requests of ``--tokens`` tokens one at a time (greedy, bench.serving's workload) and reads
every process's CPU time (``psutil``) and every thread's run time
(``/proc/PID/task/TID/schedstat``) before and after; the client's own CPU too.

    python -m bench.process_cpu --url http://127.0.0.1:3005/v1 --pid SERVER_PID
    python -m bench.process_cpu --url 'http://127.0.0.1:3004/v1#model' --pid LLAMA_SERVER_PID
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace

import psutil

from bench.serving import Target, _client, _one_request, make_workload


def _threads(procs: list[psutil.Process]) -> dict[tuple[int, int], float]:
    """Seconds each thread has run, by (pid, tid)."""
    found = {}
    for proc in procs:
        for thread in proc.threads():
            try:
                with open(f"/proc/{proc.pid}/task/{thread.id}/schedstat") as f:
                    found[(proc.pid, thread.id)] = int(f.read().split()[0]) / 1e9
            except OSError:  # the thread ended
                pass
    return found


def _cpu(procs: list[psutil.Process]) -> dict[int, float]:
    return {p.pid: sum(p.cpu_times()[:2]) for p in procs if p.is_running()}


async def measure(target: Target, pid: int, requests: int, tokens: int) -> None:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    client, model = await _client(target)
    work = [replace(item, max_tokens=tokens) for item in make_workload(requests)]
    await _one_request(client, model, work[0])  # warm
    cpu, threads, own = _cpu(procs), _threads(procs), time.process_time()
    records = [await _one_request(client, model, item) for item in work]
    own = time.process_time() - own
    cpu_after, threads_after = _cpu(procs), _threads(procs)
    made = sum(r.output_tokens for r in records) or 1
    median = sorted(r.latency for r in records)[len(records) // 2]
    print(f"{target.url}: {made} tokens, median latency {median:.3f} s, CPU ms a token:")
    print(f"  client: {own / made * 1e3:.3f}")
    for proc in procs:
        if proc.pid in cpu and proc.pid in cpu_after:
            spent = cpu_after[proc.pid] - cpu[proc.pid]
            if spent > 0.01:
                name = " ".join(proc.cmdline()[-6:])[-70:]
                print(f"  process {proc.pid} ({name}): {spent / made * 1e3:.3f}")
    for key, run in threads_after.items():
        if key in threads and run - threads[key] > 0.01:
            print(f"    thread {key[1]} of {key[0]}: {(run - threads[key]) / made * 1e3:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="[NAME=]URL[#MODEL]")
    parser.add_argument("--pid", type=int, required=True, help="the server's top process")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    asyncio.run(measure(Target.parse(args.url), args.pid, args.requests, args.tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
