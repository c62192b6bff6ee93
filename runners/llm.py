"""The LLM runner: a BentoML service that owns the model and streams token ids.

It never sees a chat message or a user string. Its one API takes prompt token ids and
sampling parameters and streams newline-delimited JSON, one :class:`GenerationChunk`
per line, so the stream can be re-framed whatever the transport does to chunk borders.
"""

from __future__ import annotations

import contextlib
import importlib.util
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
from logic.protocol import SamplingParams, StructuredOutput
from logic.settings import TOKENIZER_SUFFIX, Settings, get_settings
from runners.client import BUSY, INVALID, STOPPED
from runners.engine_api import Engine, engine_metrics
from runners.engine_errors import EngineBusyError, EngineClosedError, EngineRequestError
from runners.image import bento_image
from runners.traffic import fix_request_timeout

if TYPE_CHECKING:
    from runners.engine import GenerationEngine

logger = logging.getLogger(__name__)


def pin_bento_model(settings: Settings, here: Path = Path(__file__)) -> None:
    """Inside a built Bento, serve the exact model version it recorded at build time.

    A Bento lists its models by exact tag, but ``BentoModel("name")`` would take the newest
    ``name`` in the store; and a runner served alone (``--service-name LLMRunner``) does not
    get the env the Bento recorded. So when this file runs from ``<bento>/src/runners/`` and
    ``LLM_MODEL`` is not set, the runner's model in ``<bento>/bento.yaml`` is the one served
    (in an API-only Bento, the version of the tokenizer entry the API recorded).
    """
    src = here.resolve().parents[1]
    bento_manifest = src.parent / "bento.yaml"
    if "model" in settings.model_fields_set or src.name != "src" or not bento_manifest.is_file():
        return
    manifest = yaml.safe_load(bento_manifest.read_text())
    models = {
        s.get("name"): [m["tag"] for m in s.get("models") or []]
        for s in manifest.get("services") or []
    }
    if models.get("LLMRunner"):
        settings.model = models["LLMRunner"][0]
        return
    # An API-only Bento (bentofile.api.yaml) holds the tokenizer entry: the same version.
    for tag in models.get("ChatAPI", []):
        name, _, version = tag.partition(":")
        if name.endswith(TOKENIZER_SUFFIX):
            settings.model = f"{name.removesuffix(TOKENIZER_SUFFIX)}:{version}"


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


def resolve_engine(setting: str) -> str:
    """The engine ``LLM_ENGINE`` names; ``auto`` is vllm when vLLM is installed and a CUDA GPU
    is visible, else native (on a CPU ours starts in seconds where vLLM compiles first)."""
    if setting != "auto":
        return setting
    if importlib.util.find_spec("vllm") is None:
        return "native"
    import torch  # the runner's process only

    return "vllm" if torch.cuda.is_available() else "native"


def create_engine(model_path: str | Path) -> Engine:
    """The one place an engine is chosen and built, on a store entry's files."""
    choice = resolve_engine(settings.engine)
    if settings.device == "simulated":  # the simulation is our engine's, never vLLM's
        if settings.engine == "vllm":
            raise ValueError("LLM_DEVICE=simulated runs our engine: set LLM_ENGINE=native")
        choice = "native"
    if choice == "vllm":
        from runners.vllm_engine import VLLMEngine

        return VLLMEngine.load(model_path, settings)
    # Our engine: "auto" batches Llama-family models and falls back to transformers' unbatched
    # path for others; "native" insists on the batched path, "transformers" on the other.
    return _native_engine(model_path, backend=settings.engine)


def _native_engine(model_path: str | Path, backend: str) -> GenerationEngine:
    from runners.engine import (
        GenerationEngine,  # torch is imported here, never at module level
    )

    return GenerationEngine.load(
        model_path,
        device=settings.device,
        dtype=settings.dtype,
        threads=settings.torch_threads,
        backend=backend,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_in_flight=settings.runner_max_in_flight,
        packed_weights=settings.cpu_packed_weights,
        kv_cache_gib=settings.kv_cache_gib,
        kv_cache_fraction=settings.kv_cache_fraction,
        kv_block_size=settings.kv_block_size,
        prefix_caching=settings.prefix_caching,
        simulated_answer_tokens=settings.simulated_answer_tokens,
    )


def runner_gpus() -> int:
    """GPUs the runner asks for: vLLM splits the model over ``LLM_VLLM_TENSOR_PARALLEL_SIZE``."""
    return settings.vllm_tensor_parallel_size if settings.engine == "vllm" else 1


_resources: dict[str, object] = {"gpu": runner_gpus(), "memory": settings.runner_memory}
if settings.runner_gpu_type:
    _resources["gpu_type"] = settings.runner_gpu_type


@bentoml.service(
    resources=_resources,
    workers=1,  # one process owns the device and schedules all requests on it
    traffic={"timeout": settings.runner_timeout, "concurrency": settings.runner_concurrency},
    image=bento_image(settings, with_runner=True),  # a Bento of the runner alone
)
class LLMRunner:
    model = bentoml.models.BentoModel(settings.model)

    def __init__(self) -> None:
        configure_worker_logging("LLMRunner")
        self.engine = create_engine(self.model.path)

    @bentoml.on_shutdown
    def _close_engine(self) -> None:
        """After the graceful drain: stop the engine (vLLM: its engine-core processes too)."""
        self.engine.close()

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
        structured: StructuredOutput | None = None,
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
                structured=structured,
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
        except EngineRequestError as exc:  # the client's fault: the API answers 400
            error = {"error": str(exc), "code": INVALID, "reason": exc.code, "param": exc.param}
            yield json.dumps(error) + "\n"
        except EngineClosedError:  # the API answers 503, as for a runner that is away
            yield json.dumps({"error": "the engine stopped", "code": STOPPED}) + "\n"
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
