"""The LLM runner: a BentoML service that owns the model and streams token ids.

It never sees a chat message or a user string. Its one API takes prompt token ids and
sampling parameters and streams newline-delimited JSON, one :class:`GenerationChunk`
per line, so the stream can be re-framed whatever the transport does to chunk borders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING

import bentoml
import yaml

from logic import logs
from logic.auth import MetricsGuard
from logic.protocol import SamplingParams
from logic.settings import Settings, get_settings
from runners.client import BUSY
from runners.engine_errors import EngineBusyError
from runners.traffic import fix_request_timeout

if TYPE_CHECKING:
    from runners.engine import GenerationEngine

logger = logging.getLogger(__name__)


def pin_bento_model(settings: Settings, here: Path = Path(__file__)) -> None:
    """Inside a built Bento, serve the exact model version it recorded at build time.

    A Bento lists its models by exact tag, but ``BentoModel("name")`` would take the newest
    ``name`` in the store; and a runner served alone (``--service-name LLMRunner``) does not
    get the env the Bento recorded. So when this file runs from ``<bento>/src/runners/`` and
    ``LLM_MODEL`` is not set, the runner's model in ``<bento>/bento.yaml`` is the one served.
    """
    src = here.resolve().parents[1]
    bento_manifest = src.parent / "bento.yaml"
    if "model" in settings.model_fields_set or src.name != "src" or not bento_manifest.is_file():
        return
    manifest = yaml.safe_load(bento_manifest.read_text())
    for service in manifest.get("services") or []:
        if service.get("name") == "LLMRunner" and service.get("models"):
            settings.model = service["models"][0]["tag"]


settings = get_settings()
pin_bento_model(settings)
fix_request_timeout()  # for both services: service.py imports this module too


def configure_worker_logging(service_name: str) -> None:
    """JSON (or text) logs in a served worker, labelled ``name:worker``; tests that build a
    service in their own process keep pytest's logging."""
    worker = bentoml.server_context.worker_index
    if worker is not None:
        logs.configure_logging(
            settings.log_format, settings.log_level, service=f"{service_name}:{worker}"
        )


def create_engine(model_path: str | Path) -> GenerationEngine:
    """The engine for a store entry, on the device and dtype the settings ask for."""
    from runners.engine import (
        GenerationEngine,  # torch is imported here, never at module level
    )

    return GenerationEngine.load(
        model_path,
        device=settings.device,
        dtype=settings.dtype,
        threads=settings.torch_threads,
        backend=settings.engine,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_in_flight=settings.runner_max_in_flight,
        packed_weights=settings.cpu_packed_weights,
    )


def engine_metrics(engine: GenerationEngine) -> str:
    """The engine's load in Prometheus text format, for autoscalers and dashboards.

    ``llm_runner_requests_in_flight`` (running + waiting) is what the Kubernetes
    HorizontalPodAutoscaler of the runner scales on.
    """
    stats = engine.stats
    series = [
        ("requests_running", "gauge", "Sequences in the running batch.", engine.running),
        ("requests_waiting", "gauge", "Requests queued for a batch slot.", engine.waiting),
        (
            "requests_in_flight",
            "gauge",
            "Requests running or waiting: the runner's autoscaling metric.",
            engine.running + engine.waiting,
        ),
        ("batch_slots", "gauge", "Most sequences in one step.", engine.max_batch_size),
        ("max_in_flight", "gauge", "Requests held at most; more get a 429.", engine.max_in_flight),
        ("engine_up", "gauge", "1 while the engine takes requests, 0 once it stopped.",
         int(not engine.closed)),
        ("steps_total", "counter", "Forward steps run.", stats.steps),
        ("busy_seconds_total", "counter", "Seconds spent in steps (forward pass and sampling): "
         "its rate is the model's busy fraction.", round(stats.busy_seconds, 6)),
        ("prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats.prefill_tokens),
        ("decode_tokens_total", "counter", "Tokens decoded after each first.", stats.decode_tokens),
        ("requests_finished_total", "counter", "Requests that ran to the end.", stats.finished),
        ("requests_cancelled_total", "counter", "Requests whose client left.", stats.cancelled),
        ("requests_refused_total", "counter", "Requests turned away at max_in_flight (a 429).",
         stats.refused),
    ]  # fmt: skip
    lines = []
    for name, kind, help_text, value in series:
        lines += [
            f"# HELP llm_runner_{name} {help_text}",
            f"# TYPE llm_runner_{name} {kind}",
            f"llm_runner_{name} {value}",
        ]
    return "\n".join(lines) + "\n"


_resources: dict[str, object] = {"gpu": 1, "memory": settings.runner_memory}
if settings.runner_gpu_type:
    _resources["gpu_type"] = settings.runner_gpu_type


@bentoml.service(
    resources=_resources,
    workers=1,  # one process owns the device and schedules all requests on it
    traffic={"timeout": settings.runner_timeout, "concurrency": settings.runner_concurrency},
)
class LLMRunner:
    model = bentoml.models.BentoModel(settings.model)

    def __init__(self) -> None:
        configure_worker_logging("LLMRunner")
        self.engine = create_engine(self.model.path)

    def __is_alive__(self) -> bool:
        """``/livez``: False once the engine's scheduler died, so an orchestrator restarts us."""
        return not self.engine.closed

    def __is_ready__(self) -> bool:
        """``/readyz``: the model is loaded (``__init__`` returned) and the engine runs."""
        return not self.engine.closed

    def __metrics__(self, content: str) -> str:
        """``/metrics``: BentoML's own series, then the engine's load."""
        return content + engine_metrics(self.engine)

    @bentoml.api
    async def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logprobs: bool = False,
        top_logprobs: int = 0,
        request_id: str | None = None,
    ) -> AsyncGenerator[str, None]:
        """Stream generated token ids as NDJSON lines; an ``{"error": ...}`` line on failure.

        Lines leave out empty fields (``finish_reason`` until the last, ``logprobs`` unless
        asked for): :class:`GenerationChunk` reads them back as None. ``request_id`` is the
        API's, so this side of the request logs under the same id.
        """
        logs.request_id.set(logs.incoming_request_id(request_id))
        started, tokens, finish = time.perf_counter(), 0, None
        try:
            params = SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop_token_ids=stop_token_ids or [],
                presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
            )
            # aclosing: a client that hangs up ends the engine request now, not at GC time.
            async with contextlib.aclosing(self.engine.stream(prompt_ids, params)) as chunks:
                async for chunk in chunks:
                    tokens += len(chunk.token_ids)
                    finish = chunk.finish_reason or finish
                    yield chunk.model_dump_json(exclude_none=True) + "\n"
        except EngineBusyError:
            # Backpressure, not a failure: the API answers 429 with Retry-After.
            yield json.dumps({"error": "the runner is at capacity", "code": BUSY}) + "\n"
        except (ValueError, RuntimeError) as exc:
            # Headers are gone once a stream starts: report in-band, keep the details here.
            logger.exception("generation failed")
            yield (json.dumps({"error": f"generation failed: {type(exc).__name__}"}) + "\n")
        finally:
            fields = {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": tokens,
                "finish_reason": finish,  # None: refused, failed, or the client left
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            }
            logger.info("runner generation ended", extra={"fields": fields})


# /metrics behind LLM_METRICS_API_KEY when that is set.
LLMRunner.add_asgi_middleware(MetricsGuard)
