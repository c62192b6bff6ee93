"""The generation engine: a Hugging Face causal LM, its device, and a token loop.

This is the only module that imports torch and transformers at serve time. It speaks
token ids only: prompt ids and :class:`SamplingParams` in, :class:`GenerationChunk` s out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from logic.protocol import FinishReason, GenerationChunk, SamplingParams

logger = logging.getLogger(__name__)

GREEDY_BELOW = 1e-5  # temperatures this small are argmax in all but name
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(setting: str = "auto") -> torch.device:
    """``auto`` is cuda when a GPU is visible, else cpu."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on cuda (half the memory traffic per decode step), float32 on cpu."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[setting]


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Next token from one row of logits: argmax at temperature 0, else temperature + top-p."""
    if params.temperature < GREEDY_BELOW:  # dividing by ~0 overflows to inf, then NaN
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest head whose mass reaches top_p (the first token always stays).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > params.top_p
        sorted_probs[outside] = 0.0
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class _Sequence:
    """One request's state between steps."""

    params: SamplingParams
    generator: torch.Generator
    cache: Any = None
    length: int = 0  # tokens in the cache


class GenerationEngine:
    """Generates token streams from one model; one forward pass at a time.

    Each step runs in a worker thread so the event loop keeps serving other requests; a
    lock serializes steps, so concurrent requests interleave token by token. A consumer
    that stops iterating (client gone, stop string matched) ends its request at the next
    step, and its KV cache is released with it.
    """

    def __init__(self, model: Any, device: torch.device, context_length: int):
        self.model = model
        self.device = device
        self.context_length = context_length
        self.vocab_size = model.config.vocab_size
        self._lock = asyncio.Lock()

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
    ) -> GenerationEngine:
        if threads:
            torch.set_num_threads(threads)
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
        model.to(dev).eval()
        context = int(getattr(model.config, "max_position_embeddings", 2048))
        logger.info("Loaded %s on %s as %s", path, dev, torch_dtype)
        engine = cls(model, dev, context)
        engine.warm_up()
        return engine

    def warm_up(self) -> None:
        """One short forward pass, so the first request does not pay for lazy init."""
        seq = self._new_sequence(SamplingParams(max_new_tokens=1, temperature=0.0))
        self._step(seq, [0, 1])

    def _new_sequence(self, params: SamplingParams) -> _Sequence:
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        return _Sequence(params=params, generator=generator)

    @torch.inference_mode()
    def _step(self, seq: _Sequence, input_ids: list[int]) -> int:
        """Feed ``input_ids`` (the prompt, or the last token) and sample the next token."""
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=seq.cache, use_cache=True)
        seq.cache = out.past_key_values
        seq.length += len(input_ids)
        return sample_token(out.logits[0, -1], seq.params, seq.generator)

    async def _locked_step(self, seq: _Sequence, feed: list[int]) -> int:
        """One step in a worker thread. If the caller is cancelled meanwhile, the lock is
        still held until the thread is done, so two forward passes never overlap."""
        async with self._lock:
            step = asyncio.ensure_future(asyncio.to_thread(self._step, seq, feed))
            try:
                return await asyncio.shield(step)
            except asyncio.CancelledError:
                await asyncio.wait([step])
                raise

    def validate(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        if len(prompt_ids) >= self.context_length:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens fills the context window")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise ValueError(f"prompt_ids out of the vocabulary (0..{self.vocab_size - 1})")

    async def stream(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        """Generated tokens, one chunk per step; the last chunk carries the finish reason."""
        self.validate(prompt_ids)
        seq = self._new_sequence(params)
        stop_ids = set(params.stop_token_ids)
        feed = prompt_ids
        produced = 0
        try:
            while True:
                token = await self._locked_step(seq, feed)
                produced += 1
                finish: FinishReason | None = None
                if token in stop_ids:
                    finish = "stop"
                elif produced >= params.max_new_tokens or seq.length + 1 >= self.context_length:
                    finish = "length"
                yield GenerationChunk(token_ids=[token], finish_reason=finish)
                if finish is not None:
                    return
                feed = [token]
        finally:
            seq.cache = None  # free the KV cache as soon as the request leaves
