"""Routing over runner replicas, measured: round robin vs least-loaded vs prefix-aware.

    make bench-replicas                       # the committed report's settings
    python -m bench.replicas --device simulated --replicas 2,4 --out docs/replicas

For each replica count and routing policy it starts that many runners (each its own
``start-http-server --service-name LLMRunner`` on a port of its own, fresh, so no policy
inherits another's prefix caches) and one API over them (``LLM_RUNNER_URL`` lists them,
``LLM_RUNNER_ROUTING`` picks the policy), then runs the same seeded chat-product workload:

* ``--users`` users, each with a system prompt of its own (a persona and their account
  details) after a tenant-wide prompt that every user shares (the product's instructions);
* each user holds a conversation of ``--turns`` turns: every turn sends the whole history
  and waits for the answer before the next, as a chat UI does;
* ``--clients`` users are in conversation at once; a client takes the next user when its
  user's conversation ends.

It reads, per run: time to first token p50/p95, output throughput, the cached-token
fraction (``usage.prompt_tokens_details.cached_tokens`` over prompt tokens: the runners'
own count), and balance (the most requests any replica served over the fewest). A run with
one replica alone gives the cached fraction to compare against (what one shared cache
reaches on the same workload). Writes report.md and results.json to ``--out``, prints the
table and the issue's targets for prefix-aware against round robin.

On ``--device simulated`` each runner is our engine over a SIMULATED accelerator
(runners/simulated.py: Llama-3-8B bf16 on one H100 as a latency model), which charges
prefill only for the tokens it computes: a cached block is as cheap there as on a GPU. With
``--device cpu`` it is the real default model on this host's cores, split between the
runners (``LLM_TORCH_THREADS``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench.serving import percentile
from bench.suite import server
from bench.topology import read_busy
from tests.served import own_home

START = [sys.executable, "-m", "bentoml_cli._internal.start", "start-http-server"]
POLICIES = ("round_robin", "least_loaded", "prefix")

TENANT = (
    "You are the assistant of Acme Travel, an online travel agency. Follow these rules in "
    "every answer. Be friendly, brief and precise. Quote prices in euros. Never invent "
    "flight numbers, hotel names or prices: say you will check instead. Bookings can be "
    "changed for free up to 24 hours before departure; after that a fee of 40 euros "
    "applies. Refunds take five to seven working days. Our support line is open from 8 to "
    "20, Monday to Saturday. Travel insurance covers cancellations for illness with a "
    "doctor's note. Passengers need a valid passport for trips outside the Schengen area. "
)
NAMES = ["Ada", "Bruno", "Chloe", "Dev", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
         "Kira", "Luca", "Mona", "Nils", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tara",
         "Uma", "Viktor", "Wen", "Xavi", "Yara", "Zoe"]  # fmt: skip
CITIES = ["Lisbon", "Oslo", "Kyoto", "Lima", "Cairo", "Quebec", "Hanoi", "Perth", "Tunis",
          "Bergen", "Cusco", "Porto", "Riga", "Sapporo", "Seville", "Tallinn"]  # fmt: skip
QUESTIONS = [
    "Can I still change my flight to {city}?", "What does the insurance cover?",
    "How long does a refund take?", "Do I need a passport for {city}?",
    "Suggest three things to do in {city}.", "What is the weather like in {city} in May?",
    "Can I add a second bag?", "Is breakfast included at my hotel in {city}?",
    "What if my flight to {city} is delayed?", "Can I bring my dog?",
]  # fmt: skip


@dataclass(frozen=True)
class User:
    system: str
    questions: list[str]
    max_tokens: list[int]


MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]  # fmt: skip


def tenant_prompt(seed: int = 0) -> str:
    """The product's instructions and its destination notes: the same for every user."""
    rng = random.Random(seed)
    notes = " ".join(
        f"{city}: flights daily, hotels from {rng.randint(40, 200)} euros a night, best in "
        f"{rng.choice(MONTHS)}." for city in CITIES
    )  # fmt: skip
    return TENANT + "Destinations we serve. " + notes + " "


def make_users(
    n: int, turns: int, *, min_tokens: int, max_tokens: int, bookings: int = 60, seed: int = 0
):
    """``n`` users (the same for a seed): the tenant prompt, then a prompt of their own (who
    they are and their ``bookings`` past bookings: what a support bot is given)."""
    rng = random.Random(seed)
    tenant = tenant_prompt(seed)
    users = []
    for i in range(n):
        name, city = NAMES[i % len(NAMES)], rng.choice(CITIES)
        history = " ".join(
            f"{rng.randint(2019, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}: "
            f"{rng.choice(CITIES)}, {rng.randint(1, 14)} nights, {rng.randint(90, 2400)} euros."
            for _ in range(bookings)
        )  # fmt: skip
        own = (
            f"You are talking to {name} (customer {1000 + i}), who prefers "
            f"{rng.choice(['short', 'detailed', 'playful', 'formal'])} answers. {name} is "
            f"booked to fly to {city}. Past bookings: {history} "
        )
        questions = [rng.choice(QUESTIONS).format(city=city) for _ in range(turns)]
        budgets = [rng.randint(min_tokens, max_tokens) for _ in range(turns)]
        users.append(User(tenant + own, questions, budgets))
    return users


@dataclass
class Turn:
    ttft: float | None = None
    latency: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


async def _turn(client, model: str, messages: list[dict], max_tokens: int) -> tuple[Turn, str]:
    start = time.perf_counter()
    turn, text = Turn(), []
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if turn.ttft is None:
                    turn.ttft = time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                turn.prompt_tokens = chunk.usage.prompt_tokens
                turn.output_tokens = chunk.usage.completion_tokens
                details = chunk.usage.prompt_tokens_details
                turn.cached_tokens = (details.cached_tokens or 0) if details else 0
    except Exception as exc:  # a benchmark reports failures, it does not stop on them
        turn.error = f"{type(exc).__name__}: {exc}"
    turn.latency = time.perf_counter() - start
    return turn, "".join(text)


async def run_workload(url: str, users: list[User], clients: int) -> tuple[list[Turn], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0,
                                timeout=900)  # fmt: skip
    model = (await client.models.list()).data[0].id
    queue: asyncio.Queue[User] = asyncio.Queue()
    for user in users:
        queue.put_nowait(user)
    turns: list[Turn] = []

    async def worker() -> None:
        while not queue.empty():
            user = queue.get_nowait()
            messages = [{"role": "system", "content": user.system}]
            for question, budget in zip(user.questions, user.max_tokens, strict=True):
                messages.append({"role": "user", "content": question})
                turn, answer = await _turn(client, model, messages, budget)
                turns.append(turn)
                messages.append({"role": "assistant", "content": answer})

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return turns, wall


def _routed(api_url: str) -> dict[str, float]:
    """Requests the API sent to each replica (all reasons), from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{api_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llm_api_runner_routed_total":
                replica = sample.labels["replica"]
                counts[replica] = counts.get(replica, 0) + sample.value
    return counts


@dataclass
class Result:
    replicas: int
    policy: str
    requests: int
    errors: int
    wall_s: float
    output_tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    cached_fraction: float
    balance: float | None  # most requests on a replica / fewest
    mean_prompt_tokens: float = 0.0
    busy_s: float = 0.0  # the runners' model time, all replicas (a simulated device's own)
    per_replica: dict[str, float] = field(default_factory=dict)


def run_one(
    args, replicas: int, policy: str, users: list[User], logs: Path, slack: int | None = None
) -> Result:
    threads = args.threads or max(1, (os.cpu_count() or 1) // replicas)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update(LLM_DEVICE=args.device, BENTOML_DO_NOT_TRACK="true")
    if args.device == "simulated":
        env["LLM_ENGINE"] = "native"
    runner_env = {**env, "LLM_TORCH_THREADS": str(threads)}
    tag = f"{replicas}x-{policy}" + (f"-slack{slack}" if slack is not None else "")
    store = os.environ.get("BENTOML_HOME") or str(Path.home() / "bentoml")
    with ExitStack() as stack:
        homes = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-replicas-")))
        urls = []
        for i in range(replicas):
            port = args.port + 1 + i
            urls.append(f"http://127.0.0.1:{port}")
            cmd = [*START, "service:ChatAPI", "--service-name", "LLMRunner", "--port", str(port)]
            home = {"BENTOML_HOME": own_home(store, homes)}  # tests/served.py says why
            stack.enter_context(server(cmd, f"{urls[-1]}/readyz", logs / f"{tag}-runner{i}.log",
                                       {**runner_env, **home}))  # fmt: skip
        api_url = f"http://127.0.0.1:{args.port}"
        api_env = {**env, "LLM_RUNNER_URL": ",".join(urls), "LLM_RUNNER_ROUTING": policy,
                   "LLM_API_WORKERS": str(args.api_workers),
                   **({"LLM_RUNNER_BALANCE_SLACK": str(slack)} if slack is not None else {}),
                   "BENTOML_HOME": own_home(store, homes)}  # fmt: skip
        api_cmd = [*START, "service:ChatAPI", "--port", str(args.port)]
        stack.enter_context(server(api_cmd, f"{api_url}/readyz", logs / f"{tag}-api.log", api_env))
        time.sleep(2 * 0.5 + 2)  # the router's first probes (every 2 s) have seen every replica
        busy_before = sum(read_busy(f"{url}/metrics") for url in urls)
        turns, wall = asyncio.run(run_workload(api_url, users, args.clients))
        busy = sum(read_busy(f"{url}/metrics") for url in urls) - busy_before
        per_replica = _routed(api_url) if replicas > 1 else {urls[0]: float(len(turns))}
    ok = [t for t in turns if t.error is None]
    prompt = sum(t.prompt_tokens for t in ok)
    counts = [per_replica.get(url, 0.0) for url in urls]
    result = Result(
        replicas=replicas,
        policy=(policy + (f" (slack {slack})" if slack is not None else ""))
        if replicas > 1
        else "one replica",
        requests=len(turns),
        errors=len(turns) - len(ok),
        wall_s=wall,
        output_tokens_per_s=sum(t.output_tokens for t in ok) / wall,
        ttft_p50_s=percentile([t.ttft for t in ok if t.ttft is not None], 50),
        ttft_p95_s=percentile([t.ttft for t in ok if t.ttft is not None], 95),
        cached_fraction=sum(t.cached_tokens for t in ok) / prompt if prompt else 0.0,
        balance=max(counts) / min(counts) if min(counts) > 0 else None,
        per_replica=per_replica,
        mean_prompt_tokens=prompt / len(ok) if ok else 0.0,
        busy_s=busy,
    )
    errors = [t.error for t in turns if t.error]
    print(f"{tag}: {json.dumps(asdict(result))}" + (f" first error: {errors[0]}" if errors else ""),
          flush=True)  # fmt: skip
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(results: list[Result]) -> str:
    rows = ["| replicas | routing | TTFT p50 (s) | TTFT p95 (s) | output tok/s | cached "
            "fraction | balance (max/min) | model busy (s) | errors |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        rows.append(
            f"| {r.replicas} | {r.policy} | {_fmt(r.ttft_p50_s, '.3f')} | "
            f"{_fmt(r.ttft_p95_s, '.3f')} | {r.output_tokens_per_s:.1f} | "
            f"{r.cached_fraction:.2f} | {_fmt(r.balance, '.2f')} | {r.busy_s:.1f} | "
            f"{r.errors} |"
        )
    return "\n".join(rows)


def targets(results: list[Result]) -> list[str]:
    """The issue's targets for prefix-aware against round robin, per replica count."""
    lines = []
    alone = next((r for r in results if r.replicas == 1), None)
    for n in sorted({r.replicas for r in results if r.replicas > 1}):
        by = {r.policy: r for r in results if r.replicas == n}
        rr, px = by.get("round_robin"), by.get("prefix")
        if rr is None or px is None:
            continue
        checks = []
        if rr.ttft_p50_s and px.ttft_p50_s is not None:
            ratio = px.ttft_p50_s / rr.ttft_p50_s
            checks.append(f"TTFT p50 {ratio:.2f}x round robin (target <= 0.5): "
                          f"{'met' if ratio <= 0.5 else 'MISSED'}")  # fmt: skip
        ratio = px.output_tokens_per_s / rr.output_tokens_per_s
        checks.append(f"throughput {ratio:.2f}x (target >= 1.0): "
                      f"{'met' if ratio >= 1.0 else 'MISSED'}")  # fmt: skip
        if alone is not None and alone.cached_fraction:
            ratio = px.cached_fraction / alone.cached_fraction
            checks.append(f"cached fraction {ratio:.2f}x one replica's (target >= 0.8): "
                          f"{'met' if ratio >= 0.8 else 'MISSED'}")  # fmt: skip
        if px.balance is not None:
            checks.append(f"balance {px.balance:.2f} (target <= 1.5): "
                          f"{'met' if px.balance <= 1.5 else 'MISSED'}")  # fmt: skip
        lines.append(f"- {n} replicas, prefix-aware: " + "; ".join(checks))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["simulated", "cpu"], default="simulated")
    parser.add_argument("--replicas", default="2,4", help="comma-separated replica counts")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--slacks",
        default="",
        help="also prefix routing at each of these "
        "LLM_RUNNER_BALANCE_SLACK values (comma-separated): the slack's sweep",
    )
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--bookings",
        type=int,
        default=60,
        help="past bookings in each user's own prompt (about 20 tokens each)",
    )
    parser.add_argument("--min-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per runner "
                        "(default: the cores split between the runners)")  # fmt: skip
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument(
        "--no-alone",
        action="store_true",
        help="skip the one-replica run (the cached fraction's reference)",
    )
    parser.add_argument("--port", type=int, default=3300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/replicas"))
    args = parser.parse_args(argv)

    users = make_users(args.users, args.turns, min_tokens=args.min_tokens,
                       max_tokens=args.max_tokens, bookings=args.bookings,
                       seed=args.seed)  # fmt: skip
    out = args.out / args.device
    logs = out / "logs"
    results = []
    if not args.no_alone:
        results.append(run_one(args, 1, "prefix", users, logs))
    for replicas in [int(x) for x in args.replicas.split(",") if x.strip()]:
        for policy in [p for p in args.policies.split(",") if p.strip()]:
            results.append(run_one(args, replicas, policy, users, logs))
        for slack in [int(x) for x in args.slacks.split(",") if x.strip()]:
            results.append(run_one(args, replicas, "prefix", users, logs, slack))

    lines = targets(results)
    sizes = [r.mean_prompt_tokens for r in results]
    prompt_sizes = f"{min(sizes):.0f}-{max(sizes):.0f} on average" if sizes else "-"
    cpu = platform.processor() or platform.machine()
    command = " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join([
        f"# Routing over runner replicas: {args.device}",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu}, "
        f"{os.cpu_count()} cores, with `python -m bench.replicas {command}`.",
        f"{args.users} users x {args.turns} turns, {args.clients} in conversation at once, "
        f"answers of {args.min_tokens}-{args.max_tokens} tokens, greedy; every user's system "
        f"prompt is the same tenant-wide prompt, then one of the user's own ({args.bookings} "
        f"past bookings). Prompt tokens per turn: {prompt_sizes}.",
        "",
        table(results),
        "",
        *lines,
        "",
    ])  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    print(report)


if __name__ == "__main__":
    main()
