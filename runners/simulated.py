"""A SIMULATED accelerator: our real engine, with the forward pass of a GPU that is not here.

``LLM_DEVICE=simulated``. Everything but the forward pass is the real thing: the scheduler,
continuous batching, the KV block pool and prefix cache, sampling, streaming, cancellation,
the runner service and the API in front of it. What replaces the model is a stand-in that
treats the host as a CUDA device does:

* **launch** -- for each layer, the host thread spends GIL-holding Python time preparing
  and launching the layer's kernels (``launch_s_per_layer`` of its own CPU time: another
  thread holding the GIL delays it, exactly as it delays PyTorch's eager launches);
* **device time** -- each layer then runs on the "device" for its share of the step's time
  under the latency model, after the previous layer and not before its launch; it passes
  without holding the GIL and without using a core (nothing runs);
* **sync** -- the host waits (sleeping, GIL released) for the last layer when it reads the
  step's results, as ``.tolist()`` on sampled tokens does on CUDA.

So a device step overlaps with other threads' Python, and a host too busy to launch starves
the device: the two effects the monolith-or-split question turns on.

The step's device time follows :class:`LatencyModel`: a roofline of one model on one GPU
(weights and KV read at a fraction of peak memory bandwidth, FLOPs at a fraction of peak
compute, the larger of the two, plus a fixed per-step cost). The default is Llama-3-8B in
bf16 on one H100 SXM; its parameters and sources are in ``docs/topology/simulated-gpu/``.

Its tokens are deterministic: every answer is the same placeholder sentence, repeated, that
says it comes from a simulation, and ends with EOS after ``answer_tokens`` tokens (or at
``max_tokens``, whichever comes first). As on a GPU, the tokens are chosen on the device:
``forward`` returns no logits (a ``[rows, 0]`` tensor) and ``sampled`` holds the tokens, so
the host does not spend a GPU's sampling work on its own cores (64 rows over a 49k
vocabulary take 8 ms on this CPU, more than the simulated step). Where a request needs
logits (penalties, logprobs) the engine asks :meth:`full_logits`: each row -1e4 but the
chosen token at 0, so whatever the sampling parameters, it is the token chosen. Structured
outputs and tool calls are refused (a 400): a placeholder answer cannot follow a grammar.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runners.batch_model import Work

logger = logging.getLogger(__name__)

PLACEHOLDER = (
    "This answer comes from a simulated accelerator, so its words are placeholders that "
    "repeat until the answer ends. "
)


@dataclass(frozen=True)
class LatencyModel:
    """Step time of one model on one accelerator, as a function of the step's shape."""

    name: str
    layers: int
    hidden: int
    weight_bytes: float  # read once per step
    flops_per_token: float  # 2 x parameters (matmuls), per token computed
    kv_bytes_per_token: int  # all layers, K and V
    memory_bytes: float  # the device's memory (weights + KV + activations)
    bandwidth: float  # peak memory bandwidth, bytes/s
    compute: float  # peak dense FLOP/s at the model's dtype
    bandwidth_efficiency: float  # the share of peak a decode step's reads reach
    compute_efficiency: float  # the share of peak large matmuls reach
    step_overhead_s: float  # per step: sampling, the LM head's tail, small kernels
    launch_s_per_layer: float  # host CPU time to prepare and launch one layer (eager)

    def step_seconds(self, tokens: int, attended: int, context: int) -> float:
        """Device time of a step computing ``tokens`` tokens, whose queries attend to
        ``attended`` key positions in all, reading the KV of ``context`` positions."""
        if tokens == 0:
            return 0.0
        memory = (self.weight_bytes + context * self.kv_bytes_per_token) / (
            self.bandwidth * self.bandwidth_efficiency
        )
        flops = tokens * self.flops_per_token + 4 * self.layers * self.hidden * attended
        compute = flops / (self.compute * self.compute_efficiency)
        return self.step_overhead_s + max(memory, compute)


# Llama-3-8B (8.03 B parameters, 32 layers, hidden 4096, 8 KV heads of 128) in bf16 on one
# H100 SXM 80 GB (3.35 TB/s HBM3, 989 TFLOP/s dense bf16). See the report for the sources.
LLAMA3_8B_H100 = LatencyModel(
    name="Llama-3-8B bf16 on one H100 SXM (latency model)",
    layers=32,
    hidden=4096,
    weight_bytes=8.03e9 * 2,
    flops_per_token=2 * 8.03e9,
    kv_bytes_per_token=32 * 2 * 8 * 128 * 2,
    memory_bytes=80e9,
    bandwidth=3.35e12,
    compute=989e12,
    bandwidth_efficiency=0.8,
    compute_efficiency=0.6,
    step_overhead_s=0.0005,
    launch_s_per_layer=0.00008,
)


def spin_cpu(seconds: float) -> None:
    """Hold the GIL (pure Python) until this thread has had ``seconds`` of CPU time: work
    that waits when another thread has the GIL, as a launch does."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class SimulatedModel:
    """A :class:`runners.batch_model.BatchModel` whose forward pass is simulated (see the
    module's docstring). ``device_seconds`` is the simulated device's busy time."""

    paged = True
    simulated = True

    def __init__(
        self,
        *,
        vocab_size: int,
        eos_id: int,
        words: list[int],
        context_length: int,
        max_slots: int,
        latency: LatencyModel = LLAMA3_8B_H100,
        kv_budget_bytes: int | None = None,
        block_size: int = 16,
        answer_tokens: int = 256,
    ):
        if not words:
            raise ValueError("the placeholder answer has no tokens")
        self.latency = latency
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.max_slots = max_slots
        self.block_size = block_size
        self._eos = eos_id
        self._words = words
        self._answer_tokens = answer_tokens
        budget = kv_budget_bytes
        if budget is None:  # the device's memory after the weights, with 10% headroom
            budget = int(0.9 * (latency.memory_bytes - latency.weight_bytes))
        per_block = latency.kv_bytes_per_token * block_size
        self.num_blocks = 1 + max(1, budget // per_block)  # block 0 is the null block
        self._first_generated: dict[int, int] = {}  # slot -> position of its first answer token
        self._device_free = 0.0  # when the simulated device finishes what it was given
        self.sampled: list[int] = []  # the last step's tokens, one per row with logits
        self.device_seconds = 0.0
        self.steps = 0

    def kv_bytes_per_token(self) -> int:
        return self.latency.kv_bytes_per_token

    def cache_bytes(self) -> int:
        return 0  # nothing is allocated: the simulated KV lives on the simulated device

    def release(self, slot: int) -> None:
        self._first_generated.pop(slot, None)

    def forward(self, work: list[Work]) -> torch.Tensor:
        latency = self.latency
        tokens = sum(len(w.token_ids) for w in work)
        attended = sum(len(w.token_ids) * (w.position + (len(w.token_ids) + 1) / 2) for w in work)
        context = sum(w.position + len(w.token_ids) for w in work)
        device = latency.step_seconds(tokens, int(attended), context)
        per_layer = (device - latency.step_overhead_s) / latency.layers
        # Launch each layer (host Python, GIL held), queueing its device time behind the
        # previous layer's; the device waits for a launch that comes late.
        done = max(self._device_free, time.perf_counter())
        for _ in range(latency.layers):
            spin_cpu(latency.launch_s_per_layer)
            done = max(done, time.perf_counter()) + per_layer
        done += latency.step_overhead_s
        self._device_free = done
        self.sampled = self._choose(work)
        # The sync: the host reads the step's results once the device is done.
        wait = done - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        self.device_seconds += device
        self.steps += 1
        return torch.empty((len(self.sampled), 0))

    def full_logits(self) -> torch.Tensor:
        """The last step's logits, for rows whose sampling needs them."""
        logits = torch.full((len(self.sampled), self.vocab_size), -1e4)
        if self.sampled:
            logits[torch.arange(len(self.sampled)), torch.tensor(self.sampled)] = 0.0
        return logits

    def _choose(self, work: list[Work]) -> list[int]:
        chosen = []
        for item in (w for w in work if w.want_logits):
            end = item.position + len(item.token_ids)
            first = self._first_generated.setdefault(item.slot, end)
            produced = end - first  # answer tokens before this one
            if produced >= self._answer_tokens:
                chosen.append(self._eos)
            else:
                chosen.append(self._words[produced % len(self._words)])
        return chosen


def build_simulated(
    path: str | Path,
    *,
    max_slots: int,
    kv_budget_bytes: int | None,
    block_size: int,
    answer_tokens: int,
) -> SimulatedModel:
    """The simulated model for the store entry at ``path``: its tokenizer (for the
    placeholder's token ids and EOS) and its context window; the default latency model."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    config = AutoConfig.from_pretrained(str(path))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{path}'s tokenizer has no EOS token")
    words = tokenizer.encode(PLACEHOLDER, add_special_tokens=False)
    vocab = max(int(getattr(config, "vocab_size", 0) or 0), len(tokenizer))
    context = int(getattr(config, "max_position_embeddings", 8192))
    model = SimulatedModel(
        vocab_size=vocab,
        eos_id=eos,
        words=words,
        context_length=context,
        max_slots=max_slots,
        kv_budget_bytes=kv_budget_bytes,
        block_size=block_size,
        answer_tokens=answer_tokens,
    )
    logger.warning(
        "SIMULATED accelerator: %s; no model computes these answers (LLM_DEVICE=simulated)",
        model.latency.name,
    )
    return model


def decode_seconds(latency: LatencyModel, rows: int, context: int) -> float:
    """A decode step's device time at ``rows`` sequences of ``context`` positions each."""
    return latency.step_seconds(rows, rows * context, rows * context)


def describe(latency: LatencyModel) -> dict[str, Any]:
    """The latency model's figures at a few shapes, for reports."""
    out: dict[str, Any] = {"name": latency.name}
    for rows in (1, 8, 32, 64, 128):
        out[f"decode_ms_{rows}x1024"] = round(1e3 * decode_seconds(latency, rows, 1024), 2)
    prefill = latency.step_seconds(2048, 2048 * 1024, 2048)
    out["prefill_ms_2048"] = round(1e3 * prefill, 2)
    out["launch_ms_per_step"] = round(1e3 * latency.layers * latency.launch_s_per_layer, 2)
    out["tokens_per_s_1_stream"] = round(1 / decode_seconds(latency, 1, 1024), 1)
    if not math.isfinite(prefill):
        raise ValueError("the latency model is not finite")
    return out
