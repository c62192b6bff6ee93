"""The topology report's arithmetic, table and plots, apart from any server (unit-tested on
synthetic timings in tests/unit/test_topology_report.py).

Definitions:

* **busy fraction**: the share of wall time the model spends in steps (forward pass and
  sampling), from the runner's ``llm_runner_busy_seconds_total`` over the run. 1 - busy is
  the time the accelerator sat idle while requests were in the system.
* **cost per million output tokens**: what the instances a topology occupies cost per hour,
  divided by the output tokens it produced per hour, times a million.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

TOPOLOGIES = ("monolith", "split", "remote")


@dataclass(frozen=True)
class Prices:
    """Hourly prices of the instances (examples in bench/prices.yaml: change them)."""

    gpu_instance_per_hour: float
    cpu_instance_per_hour: float
    cpu_instance_cores: int = 2
    currency: str = "USD"

    @classmethod
    def load(cls, path: str | Path) -> Prices:
        data = yaml.safe_load(Path(path).read_text()) or {}
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**fields)


def busy_fraction(busy_before: float, busy_after: float, wall_s: float) -> float | None:
    """The share of ``wall_s`` the model was stepping, from two readings of its busy-seconds
    counter; None when it cannot be known (no wall time, or a counter that went backwards
    because the runner restarted)."""
    busy = busy_after - busy_before
    if wall_s <= 0 or busy < 0:
        return None
    return min(busy / wall_s, 1.0)


def instances(topology: str, api_workers: int, prices: Prices) -> dict[str, int]:
    """What a topology occupies: the model always needs one GPU instance; the monolith and
    the split topology run their API workers on its CPUs; the remote topology runs them on
    CPU instances of their own, one worker per core."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; one of {', '.join(TOPOLOGIES)}")
    cpu = math.ceil(api_workers / prices.cpu_instance_cores) if topology == "remote" else 0
    return {"gpu": 1, "cpu": cpu}


def hourly_cost(topology: str, api_workers: int, prices: Prices) -> float:
    used = instances(topology, api_workers, prices)
    return used["gpu"] * prices.gpu_instance_per_hour + used["cpu"] * prices.cpu_instance_per_hour


def cost_per_million_tokens(hourly: float, tokens_per_s: float) -> float | None:
    """``hourly`` spent on ``tokens_per_s`` output tokens; None when nothing was produced."""
    if tokens_per_s <= 0:
        return None
    return hourly / (tokens_per_s * 3600) * 1_000_000


@dataclass
class Row:
    """One measured point: a topology, a business-logic weight, a number of clients."""

    topology: str
    logic_ms: float
    clients: int
    requests: int
    errors: int
    output_tokens_per_s: float
    requests_per_s: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    busy_fraction: float | None
    api_rss_mib: float | None  # all API worker processes (None: the monolith has none)
    model_rss_mib: float | None  # the process that holds the model
    cost_per_m_tokens: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_row(
    topology: str,
    logic_ms: float,
    clients: int,
    summary: dict[str, Any],
    *,
    busy: float | None,
    api_rss_mib: float | None,
    model_rss_mib: float | None,
    api_workers: int,
    prices: Prices,
) -> Row:
    """A row from a run's summary (bench.serving.summarize) and its side readings."""
    tokens_per_s = summary["output_tokens_per_s"]
    ok = summary["requests"] - summary["errors"]
    wall = summary["wall_s"]
    return Row(
        topology=topology,
        logic_ms=logic_ms,
        clients=clients,
        requests=summary["requests"],
        errors=summary["errors"],
        output_tokens_per_s=tokens_per_s,
        requests_per_s=ok / wall if wall > 0 else 0.0,
        latency_p50_s=summary["latency_p50_s"],
        latency_p95_s=summary["latency_p95_s"],
        ttft_p50_s=summary["ttft_p50_s"],
        ttft_p95_s=summary["ttft_p95_s"],
        busy_fraction=busy,
        api_rss_mib=api_rss_mib,
        model_rss_mib=model_rss_mib,
        cost_per_m_tokens=cost_per_million_tokens(
            hourly_cost(topology, api_workers, prices), tokens_per_s
        ),
    )


# ---------------------------------------------------------------- the Markdown report

_COLUMNS = [
    ("topology", "topology", "{}"),
    ("logic_ms", "logic ms", "{:g}"),
    ("clients", "clients", "{}"),
    ("output_tokens_per_s", "output tok/s", "{:.1f}"),
    ("requests_per_s", "req/s", "{:.2f}"),
    ("latency_p50_s", "latency p50 s", "{:.2f}"),
    ("latency_p95_s", "latency p95 s", "{:.2f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
    ("ttft_p95_s", "TTFT p95 s", "{:.3f}"),
    ("busy_fraction", "model busy", "{:.0%}"),
    ("api_rss_mib", "API MiB", "{:.0f}"),
    ("model_rss_mib", "model MiB", "{:.0f}"),
    ("cost_per_m_tokens", "cost / 1M tok", "{:.2f}"),
    ("errors", "errors", "{}"),
]


def _cell(value: Any, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def table(rows: list[Row]) -> str:
    head = "| " + " | ".join(title for _, title, _ in _COLUMNS) + " |"
    rule = "|" + "---|" * len(_COLUMNS)
    body = [
        "| " + " | ".join(_cell(getattr(r, key), fmt) for key, _, fmt in _COLUMNS) + " |"
        for r in rows
    ]
    return "\n".join([head, rule, *body])


def best(rows: list[Row], logic_ms: float) -> dict[str, Row]:
    """Per topology, its row with the highest throughput at this logic weight."""
    found: dict[str, Row] = {}
    for row in rows:
        if row.logic_ms == logic_ms:
            current = found.get(row.topology)
            if current is None or row.output_tokens_per_s > current.output_tokens_per_s:
                found[row.topology] = row
    return found


def summary(rows: list[Row]) -> str:
    """One line per logic weight: each topology's best throughput, busy fraction and cost."""
    lines = []
    for logic_ms in sorted({r.logic_ms for r in rows}):
        parts = []
        for topology, row in sorted(best(rows, logic_ms).items()):
            busy = _cell(row.busy_fraction, "{:.0%}")
            cost = _cell(row.cost_per_m_tokens, "{:.2f}")
            parts.append(
                f"{topology} {row.output_tokens_per_s:.1f} tok/s ({row.clients} clients, "
                f"model busy {busy}, {cost} per 1M tokens)"
            )
        lines.append(f"business logic {logic_ms:g} ms/request: " + "; ".join(parts))
    return "\n".join(lines)


def _row(rows: list[Row], topology: str, logic_ms: float, clients: int) -> Row | None:
    return next(
        (r for r in rows if (r.topology, r.logic_ms, r.clients) == (topology, logic_ms, clients)),
        None,
    )


def ratio_table(rows: list[Row], topology: str, key: str, base: str = "monolith") -> str:
    """``topology``'s ``key`` over ``base``'s at each logic weight (rows) and client count
    (columns): above 1 the topology has more of it."""
    weights = sorted({r.logic_ms for r in rows})
    clients = sorted({r.clients for r in rows})
    lines = [
        "| logic ms | " + " | ".join(f"{c} clients" for c in clients) + " |",
        "|---|" + "---|" * len(clients),
    ]
    for weight in weights:
        cells = []
        for count in clients:
            ours, theirs = _row(rows, topology, weight, count), _row(rows, base, weight, count)
            a = getattr(ours, key) if ours else None
            b = getattr(theirs, key) if theirs else None
            cells.append(f"{a / b:.2f}×" if a is not None and b else "–")
        lines.append(f"| {weight:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crossover(rows: list[Row], topology: str = "split", margin: float = 0.05) -> list[str]:
    """Per logic weight: the client counts at which ``topology`` out-produces the monolith by
    more than ``margin``, and its ratio at the most clients; or that it never does."""
    lines = []
    clients = sorted({r.clients for r in rows})
    for weight in sorted({r.logic_ms for r in rows}):
        ratios = []
        for count in clients:
            ours = _row(rows, topology, weight, count)
            theirs = _row(rows, "monolith", weight, count)
            if ours and theirs and theirs.output_tokens_per_s > 0:
                ratios.append((count, ours.output_tokens_per_s / theirs.output_tokens_per_s))
        if not ratios:
            continue
        ahead = [(count, ratio) for count, ratio in ratios if ratio > 1 + margin]
        best_count, best_ratio = max(ratios, key=lambda item: item[1])
        top_count, top_ratio = ratios[-1]
        if ahead:
            where = ", ".join(str(count) for count, _ in ahead)
            lines.append(
                f"logic {weight:g} ms: {topology} more than {margin:.0%} ahead at {where} "
                f"clients (best {best_ratio:.2f}× at {best_count}); {top_ratio:.2f}× at "
                f"{top_count}"
            )
        else:
            lines.append(
                f"logic {weight:g} ms: {topology} never more than {margin:.0%} ahead "
                f"(best {best_ratio:.2f}× at {best_count} clients)"
            )
    return lines


def markdown(rows: list[Row], meta: dict[str, Any], plots: list[str]) -> str:
    prices: Prices = meta["prices"]
    simulated = str(meta.get("device", "")).startswith("simulated")
    post = meta.get("post_share", 0.0) or 0.0
    logic = (
        f"business logic {', '.join(f'{m:g}' for m in meta['logic_ms'])} ms of Python CPU work "
        "per request (`bench/steps.py`"
        + (f"; {1 - post:.0%} before the model, {post:.0%} on the complete answer)" if post
           else ")")
    )  # fmt: skip
    title = "# Monolith or microservices: topology report"
    if simulated:
        title += " on a SIMULATED GPU"
    lines = [
        title,
        "",
        f"Made by `{meta['command']}` on {meta['machine']}, {meta['date']}.",
        "",
        *(
            [
                f"**Device: {meta['device']}.** No model computed these answers: the runner's "
                "forward pass is a simulation (`runners/simulated.py`); everything else is the "
                "real service. See *The simulated device* below.",
                "",
            ]
            if simulated
            else []
        ),
        f"Model `{meta['model']}`; {meta['requests']} streaming requests per point, output "
        f"budgets {meta['min_tokens']}–{meta['max_tokens']} tokens (greedy); "
        f"{meta['api_workers']} API workers; {logic}.",
        "",
        f"Prices ({prices.currency}/hour, examples from `{meta['prices_file']}`): GPU instance "
        f"{prices.gpu_instance_per_hour:g}, CPU instance {prices.cpu_instance_per_hour:g} "
        f"({prices.cpu_instance_cores} cores). Monolith and split occupy one GPU instance; "
        "remote adds CPU instances for its API workers.",
        "",
        "## Summary",
        "",
        *[f"- {line}" for line in summary(rows).splitlines()],
        "",
        "## Reading it",
        "",
        "- **model busy** is the share of the run the model spent in forward passes. Below "
        "100% the accelerator waited: for requests, for the API, or for the CPU it shares. "
        "The split is meant to keep it near 100% as the business logic grows heavier.",
        "- Compare topologies at the same logic weight and clients. Where the monolith's "
        "throughput falls and its TTFT rises with the logic weight while the split's hold, "
        "the split pays; `cost / 1M tok` puts a price on it.",
        *(
            [
                "- The accelerator's busy fraction is the simulated device's own busy time "
                "(`llm_runner_device_busy_seconds_total`): below 100% it waited for the host to "
                "launch its layers, or for work."
            ]
            if simulated
            else [
                "- On a host without a GPU the model and the API workers share the same cores, "
                "so the split cannot give the model more compute: its hop and its extra "
                "processes cost a little, and the monolith is expected to stay ahead."
            ]
        ),
        "",
        "## Where the split pays",
        "",
        *[f"- {line}" for line in crossover(rows, "split") + crossover(rows, "remote")],
        "",
        "Throughput, split over monolith:",
        "",
        ratio_table(rows, "split", "output_tokens_per_s"),
        "",
        "TTFT p50, split over monolith (below 1: the split answers sooner):",
        "",
        ratio_table(rows, "split", "ttft_p50_s"),
        "",
        "Cost per million tokens, remote over monolith (below 1: the remote topology is "
        "cheaper, its CPU instances included):",
        "",
        ratio_table(rows, "remote", "cost_per_m_tokens"),
        "",
        *(_simulation_section(meta) if simulated else []),
        "## Every point",
        "",
        table(rows),
        "",
        "## Plots",
        "",
        *[f"![{Path(p).stem}]({Path(p).name})" for p in plots],
        "",
    ]
    return "\n".join(lines)


def _simulation_section(meta: dict[str, Any]) -> list[str]:
    model = meta.get("latency_model") or {}
    figures = ", ".join(f"{k} {v}" for k, v in model.items() if k != "name")
    return [
        "## The simulated device",
        "",
        f"{model.get('name', meta.get('device'))}: {figures}.",
        "",
        "Per step, the runner's host thread spends GIL-holding Python time launching each "
        "layer; each layer's device time then passes without the GIL and without a core, "
        "after the previous layer's and not before its own launch; the host sleeps until the "
        "last layer is done when it reads the step's tokens. The step's device time is a "
        "roofline: weights and KV read at 80% of the H100's 3.35 TB/s, FLOPs at 60% of its "
        "989 dense bf16 TFLOP/s, the larger of the two, plus 0.5 ms per step; 80 µs of host "
        "time launches a layer (eager PyTorch, no CUDA graphs). The sources and the model's "
        "figures against published measurements are in `docs/topology/simulated-gpu/README.md`.",
        "",
    ]


# ---------------------------------------------------------------- plots


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    """throughput.png, latency.png and busy.png in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = sorted({r.logic_ms for r in rows})
    series = sorted({(r.topology, r.logic_ms) for r in rows})

    def points(topology: str, logic_ms: float, key: str) -> tuple[list[int], list[float]]:
        chosen = sorted(
            (r for r in rows if r.topology == topology and r.logic_ms == logic_ms),
            key=lambda r: r.clients,
        )
        return [r.clients for r in chosen], [getattr(r, key) or 0.0 for r in chosen]

    paths = []
    for key, ylabel, name in [
        ("output_tokens_per_s", "output tokens / s", "throughput"),
        ("busy_fraction", "model busy fraction", "busy"),
    ]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for topology, logic_ms in series:
            style = "-" if logic_ms == weights[0] else "--"
            x, y = points(topology, logic_ms, key)
            ax.plot(x, y, style, marker="o", label=f"{topology}, logic {logic_ms:g} ms")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        if key == "busy_fraction":
            ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{ylabel} against concurrency")
        fig.tight_layout()
        paths.append(out_dir / f"{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # Latency percentiles at the highest concurrency measured, per topology and weight.
    top = max(r.clients for r in rows)
    chosen = [r for r in rows if r.clients == top]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [f"{r.topology}\n{r.logic_ms:g} ms" for r in chosen]
    width = 0.2
    for i, (key, label) in enumerate(
        [("latency_p50_s", "latency p50"), ("latency_p95_s", "latency p95"),
         ("ttft_p50_s", "TTFT p50"), ("ttft_p95_s", "TTFT p95")]
    ):  # fmt: skip
        ax.bar(
            [j + (i - 1.5) * width for j in range(len(chosen))],
            [getattr(r, key) or 0.0 for r in chosen],
            width,
            label=label,
        )
    ax.set_xticks(range(len(chosen)), labels, fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title(f"latency percentiles at {top} clients")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
