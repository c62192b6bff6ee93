"""The engine's load on ``/metrics``, as a ``prometheus_client`` collector.

``llm_runner_requests_in_flight`` (running + waiting) is what the Kubernetes
HorizontalPodAutoscaler of the runner scales on. The same series come from every engine, then
the engine's own (:meth:`contract.engine.Engine.extra_metrics`). They are read from the engine
when scraped (a collector, not instruments updated per step): the engine keeps its counters
on its scheduler thread, and a scrape is the only time anyone needs them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from contract.engine import Engine, Series

PREFIX = "llm_runner_"


def common_series(engine: Engine) -> list[Series]:
    """The series every engine exports, then the engine's own."""
    stats = engine.stats
    return [
        Series("requests_running", "gauge", "Sequences in the running batch.", engine.running),
        Series("requests_waiting", "gauge", "Requests queued for a batch slot.", engine.waiting),
        Series("requests_in_flight", "gauge",
               "Requests running or waiting: the runner's autoscaling metric.",
               engine.running + engine.waiting),
        Series("batch_slots", "gauge", "Most sequences in one step.", engine.max_batch_size),
        Series("max_in_flight", "gauge", "Requests held at most; more get a 429.",
               engine.max_in_flight),
        Series("engine_up", "gauge", "1 while the engine takes requests, 0 once it stopped.",
               int(not engine.closed)),
        Series("steps_total", "counter", "Forward steps run.", stats.steps),
        Series("busy_seconds_total", "counter", "Seconds spent in steps (forward pass and "
               "sampling): its rate is the model's busy fraction.", round(stats.busy_seconds, 6)),
        Series("prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats.prefill_tokens),
        Series("decode_tokens_total", "counter", "Tokens decoded after each first.",
               stats.decode_tokens),
        Series("requests_finished_total", "counter", "Requests that ran to the end.",
               stats.finished),
        Series("requests_cancelled_total", "counter", "Requests whose client left.",
               stats.cancelled),
        Series("requests_refused_total", "counter", "Requests turned away at max_in_flight "
               "(a 429).", stats.refused),
        Series("structured_closed_budget_total", "counter", "Constrained answers closed "
               "validly as their max_tokens or context ran out.", stats.closed_budget),
        Series("structured_closed_loop_total", "counter", "Constrained answers closed "
               "validly where they repeated themselves.", stats.closed_loop),
        *engine.extra_metrics(),
    ]  # fmt: skip


class EngineCollector(Collector):
    """The ``llm_runner_*`` families of one engine, read at each scrape."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            f"{PREFIX}engine_info", "The engine behind the runner (value always 1).",
            labels=["engine"],
        )  # fmt: skip
        info.add_metric([self.engine.name], 1)
        yield info
        for one in common_series(self.engine):
            family = CounterMetricFamily if one.kind == "counter" else GaugeMetricFamily
            yield family(f"{PREFIX}{one.name}", one.help, value=one.value)


def engine_metrics(engine: Engine) -> str:
    """The engine's series in Prometheus' text format, for a service's ``__metrics__``
    (which appends them to BentoML's own)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    return generate_latest(registry).decode()
