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

from contract.engine import Engine
from contract.errors import EngineError, to_wire
from contract.settings import gguf_tag
from contract.tokens import SamplingParams, StructuredOutput
from glue import logs
from glue.auth import MetricsGuard
from glue.bento import pin_bento_model
from glue.image import bento_image, image_envs
from glue.request_timeout import fix_request_timeout
from glue.settings import build_settings
from glue.tracing import quiet_stream_spans
from runners.metrics import engine_metrics
from runners.settings import (
    DEVICE_LIMITS,
    EngineChoice,
    RunnerSettings,
    llamacpp_settings,
    native_settings,
    resolve_engine,
    runner_settings,
    vllm_settings,
)

if TYPE_CHECKING:
    from runners.engine import GenerationEngine

logger = logging.getLogger(__name__)

settings = pin_bento_model(runner_settings())
fix_request_timeout()  # the runner served alone (its Bento) never imports service.py
quiet_stream_spans()
# The engine as declared (no torch here: the API's processes import this module): what the
# runner's resources are derived from. The runner's process resolves it again, with CUDA.
DECLARED_ENGINE = resolve_engine(settings, native_settings(), vllm_settings())
# pyproject's package sets an image running the runner installs: vLLM only when asked for by
# name, never because the build host happens to have it: LLM_ENGINE=vllm (`make build
# ENGINE=vllm`) or the Bento's argument engine=vllm (bentofile.vllm.yaml's `args`).
_ARG_ENGINE = getattr(bentoml.use_arguments(), "engine", None)
_ASKED = {settings.engine, _ARG_ENGINE}
RUNNER_EXTRAS = ("runner", "vllm") if "vllm" in _ASKED else ("runner",)
# An image whose runner runs on llama.cpp is asked for by the Bento's argument engine=llamacpp
# (bentofile.llamacpp.yaml's `args`): it installs the wheel deploy/llamacpp-wheel.sh built
# (LLM_LLAMACPP_WHEEL), as PyPI has the source only. LLM_ENGINE=llamacpp alone is `make serve
# ENGINE=llamacpp` from the tree, which builds no image.
RUNNER_ON_LLAMACPP = _ARG_ENGINE == "llamacpp"


def _runner_model(model: str) -> str:
    """The store entry the runner declares (and so its Bento packs): for an image on
    llama.cpp, the model's GGUF entry (the GGUF and tokenizer files: 98 MB for the default
    model, without its 540 MB of fp32 safetensors; ``make model`` adds it) where the store
    has one; else the model's own entry."""
    if not RUNNER_ON_LLAMACPP:
        return model
    from runners.import_model import find_in_store

    return gguf_tag(model) if find_in_store(gguf_tag(model)) is not None else model


def create_engine(model_path: str | Path, settings: RunnerSettings = settings) -> Engine:
    """The one place an engine is chosen and built, on a store entry's files."""
    has_gguf = any(Path(model_path).glob("*.gguf"))
    choice = resolve_engine(
        settings,
        native_settings(),
        vllm_settings(),
        cuda_visible=_cuda(settings),
        has_gguf=has_gguf,
    )
    if choice.engine == "vllm":
        from runners.vllm_engine import VLLMEngine

        return VLLMEngine.load(model_path, settings, vllm_settings())
    if choice.engine == "llamacpp":
        return _llamacpp_engine(model_path, settings)
    return _native_engine(model_path, settings, choice)


def _llamacpp_engine(model_path: str | Path, settings: RunnerSettings) -> GenerationEngine:
    from runners.llamacpp_model import load_engine  # llama.cpp from here on (never torch)

    native, llama = native_settings(), llamacpp_settings()
    batch, tokens = DEVICE_LIMITS["cpu"]
    return load_engine(
        model_path,
        threads=llama.llamacpp_threads or native.torch_threads,  # serve-replicas splits cores
        max_batch_size=settings.max_batch_size or batch,
        max_batch_tokens=settings.max_batch_tokens or tokens,
        max_in_flight=settings.runner_max_in_flight,
        kv_tokens=llama.llamacpp_kv_tokens,
        keep_tokens=llama.llamacpp_keep_tokens,
        host_cache_mib=llama.llamacpp_host_cache_mib,
        block_size=native.kv_block_size,
        prefix_caching=native.prefix_caching,
        closing=settings.closing(),
        streaming=settings.streaming(),
    )


def _cuda(settings: RunnerSettings = settings) -> bool:
    """Whether torch sees a CUDA (or ROCm) GPU, asked only where the answer can matter:
    without importing torch for a runner on llama.cpp (215 MiB it would keep), nor on a host
    with no GPU driver's device node, nor where torch is not installed (the llama.cpp image)."""
    if settings.engine == "llamacpp":
        return False
    # NVIDIA's driver (also in containers given a GPU), ROCm's, WSL2's.
    if not any(Path(node).exists() for node in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")):
        return False
    try:
        import torch  # the runner's process only
    except ImportError:
        return False
    return torch.cuda.is_available()


def _native_engine(
    model_path: str | Path, settings: RunnerSettings, choice: EngineChoice
) -> GenerationEngine:
    from runners.engine import GenerationEngine  # torch is imported here, never at module level

    native = native_settings()
    return GenerationEngine.load(
        model_path,
        device=settings.device,
        dtype=settings.dtype,
        threads=native.torch_threads,
        backend=choice.backend,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_in_flight=settings.runner_max_in_flight,
        packed_weights=native.cpu_packed_weights,
        kv_cache_gib=native.kv_cache_gib,
        kv_cache_fraction=native.kv_cache_fraction,
        kv_block_size=native.kv_block_size,
        prefix_caching=native.prefix_caching,
        simulated_answer_tokens=native.simulated_answer_tokens,
        closing=settings.closing(),
        streaming=settings.streaming(),
    )


_resources: dict[str, object] = {"memory": settings.runner_memory}
if DECLARED_ENGINE.gpus:  # none for llama.cpp (BentoML takes no `gpu: 0`)
    _resources["gpu"] = DECLARED_ENGINE.gpus
if settings.runner_gpu_type:
    _resources["gpu_type"] = settings.runner_gpu_type


@bentoml.service(
    resources=_resources,
    workers=1,  # one process owns the device and schedules all requests on it
    traffic={"timeout": settings.runner_timeout, "concurrency": settings.runner_concurrency},
    image=bento_image(  # a Bento of the runner alone
        build_settings(), extras=RUNNER_EXTRAS, with_runner=True, llamacpp=RUNNER_ON_LLAMACPP
    ),
    envs=image_envs(build_settings(), with_runner=True, llamacpp=RUNNER_ON_LLAMACPP),
)
class LLMRunner:
    model = bentoml.models.BentoModel(_runner_model(settings.model))

    def __init__(self) -> None:
        logs.configure_worker_logging("LLMRunner", settings.log_format, settings.log_level)
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
        except EngineError as exc:
            # Headers are gone once a stream starts: the error goes in-band, in the one
            # encoding the API's client reads back (contract/errors.py). A busy engine is
            # backpressure (the API answers 429), a refused request the client's fault (400),
            # a stopped engine as good as a runner that is away (503).
            yield json.dumps(to_wire(exc)) + "\n"
        except (ValueError, RuntimeError) as exc:
            # Anything else: report in-band, keep the details here.
            logger.exception("generation failed")
            failed = EngineError(f"generation failed: {type(exc).__name__}")
            yield json.dumps(to_wire(failed)) + "\n"
        finally:
            fields = {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": tokens,
                "finish_reason": finish,  # None: refused, failed, or the client left
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            }
            logger.info("runner generation ended", extra={"fields": fields})


# /metrics behind LLM_METRICS_API_KEY when that is set.
LLMRunner.add_asgi_middleware(MetricsGuard, key=lambda: settings.metrics_api_key)
