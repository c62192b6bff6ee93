"""One forward pass over a ragged batch: decode tokens and prefill chunks, each with its KV.

The scheduler (``runners/engine.py``) decides what runs in a step; a *batch model* runs it.
A step is a list of :class:`Work` items, one per sequence: the tokens to feed (one for a
decode step, a slice of the prompt for a prefill chunk), the position of the first of them,
and where the sequence's KV lives. The result is the logits of each item's last token.

Two implementations:

:class:`PagedLlama`
    The fast path for Llama-family decoders (llama, mistral without a sliding window,
    qwen2, qwen3). It reuses the Hugging Face module weights and layers (norms, MLPs,
    projections) but replaces the attention and the cache: every token of the step is one
    row of a flat ``[tokens, hidden]`` matrix, so the weights are read once per step
    however many sequences take part and no padding is computed. K/V live in one paged
    pool, ``[layers, blocks * block_size, 2 (K, V), kv_heads, head_dim]``, allocated once from the
    KV memory budget; a sequence's positions are the blocks of its block table
    (:mod:`runners.kv_blocks` hands them out), so sequences share cached prefix blocks and
    memory never grows past the budget.

:class:`SequentialHF`
    Any other causal LM: a ``DynamicCache`` per slot and one ``model(...)`` call per item.
    Correct for every architecture transformers can load, but without batching or prefix
    caching.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from runners.work import BatchModel, Work

logger = logging.getLogger(__name__)

_PACK_HINT = 8  # the batch size oneDNN lays packed weights out for (any size works)
# Step sizes (rows) at which plain and packed matmuls are timed against each other at load;
# a step uses the choice of the largest of these at or below its own row count.
_TUNED_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 512)
# A CPU allocation this large comes straight from mmap (glibc's threshold is at most 32 MiB),
# so its pages are the kernel's zero pages until written.
_LAZY_POOL_BYTES = 64 << 20
NATIVE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_UNSUPPORTED_ROPE = frozenset({"dynamic", "longrope"})  # inv_freq changes with length


def native_support(config: Any) -> str | None:
    """Why :class:`PagedLlama` cannot run this config, or None when it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in NATIVE_MODEL_TYPES:
        return f"model_type {model_type!r} has no native path"
    window = getattr(config, "sliding_window", None)
    sliding = window and getattr(config, "use_sliding_window", True)
    if sliding and window < getattr(config, "max_position_embeddings", 0):
        return "sliding-window attention"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) in _UNSUPPORTED_ROPE:
        return f"rope type {rope.get('rope_type')!r}"
    if getattr(config, "layer_types", None) and any(
        kind != "full_attention" for kind in config.layer_types
    ):
        return "layers other than full attention"
    return None


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """KV memory of one token position, all layers, keys and values."""
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.empty(0, dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * kv_heads * head_dim * element


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections of the same input, so a step runs one
    matmul instead of several. The modules' own parameters become views of it: no copy."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    has_bias = [linear.bias is not None for linear in linears]
    bias = None
    if any(has_bias):
        bias = torch.cat([
            linear.bias.detach() if linear.bias is not None
            else weight.new_zeros(linear.weight.shape[0])
            for linear in linears
        ])  # fmt: skip
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(weight[start : start + rows], requires_grad=False)
        if bias is not None and linear.bias is not None:
            linear.bias = torch.nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PagedLlama:
    """Ragged continuous-batching forward over a paged KV pool, for a Llama-family model."""

    paged = True

    def __init__(
        self,
        model: Any,
        *,
        max_slots: int,
        context_length: int,
        num_blocks: int,
        block_size: int = 16,
        packed_weights: bool = True,
    ):
        reason = native_support(model.config)
        if reason:
            raise ValueError(f"no native path for this model: {reason}")
        cfg = model.config
        self.model = model
        self.max_slots = max_slots
        self.context_length = context_length
        self.vocab_size = cfg.vocab_size
        self.device = model.device
        self.dtype = model.dtype
        self.layers = model.model.layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.group = self.heads // self.kv_heads
        self.scale = self.head_dim**-0.5
        # One QKV matmul per layer. (Fusing gate and up as well measured slower on CPU:
        # MKL handles an 8 x 3072 output worse than two 8 x 1536 ones.)
        self._qkv = [
            _fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
            for layer in self.layers
        ]
        self._packed: dict[int, torch.Tensor] = {}
        self._packed_at: list[tuple[int, bool]] = []  # (rows, packed faster), by rows
        self._packed_for: dict[int, bool] = {}  # the choice per row count, as looked up
        if packed_weights and self.device.type == "cpu" and self.dtype == torch.float32:
            self._pack_weights()
            if self._packed:
                self._packed_at = self._time_packed()
        rotary = model.model.rotary_emb
        self._inv_freq = rotary.inv_freq.float().to(self.device)
        self._rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self._cos = self._sin = torch.empty(0, device=self.device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._offsets = torch.arange(block_size, device=self.device)
        # The whole budget at once. Positions the attention masks out are still multiplied
        # by zero, so the pool must never hold NaNs: block 0 (padding) is never written, and
        # fresh memory must read as zeros. A large CPU allocation is fresh pages from the
        # kernel, zero-filled on first touch, so resident memory grows with use up to the
        # budget; anything smaller, and a GPU's memory, is zeroed here.
        # Keys and values of a position side by side: one write and one gather per layer.
        shape = (len(self.layers), num_blocks * block_size, 2, self.kv_heads, self.head_dim)
        lazy = (
            self.device.type == "cpu"
            and kv_bytes_per_token(cfg, self.dtype) * (num_blocks * block_size) >= _LAZY_POOL_BYTES
        )
        make = torch.empty if lazy else torch.zeros
        self._kv = make(shape, dtype=self.dtype, device=self.device)

    # -- cache ---------------------------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.model.config, self.dtype)

    def release(self, slot: int) -> None:
        """Nothing to do: the scheduler's block pool decides who writes which block next."""

    def cache_bytes(self) -> int:
        return self._kv.numel() * self._kv.element_size()

    def _rope(self, positions: torch.Tensor, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at ``positions`` (all below ``needed``, known on the host: no sync)."""
        if self._cos.shape[0] < needed:
            size = min(self.context_length, max(needed, 2 * self._cos.shape[0], 256))
            t = torch.arange(size, device=self.device, dtype=torch.float32)
            freqs = torch.outer(t, self._inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos = (emb.cos() * self._rope_scale).to(self.dtype)
            self._sin = (emb.sin() * self._rope_scale).to(self.dtype)
        return self._cos[positions], self._sin[positions]

    def _pool_index(self, blocks: tuple[int, ...], start: int, end: int) -> list[int]:
        """Rows of the pool that hold positions ``start..end-1`` of a sequence."""
        size = self.block_size
        return [blocks[p // size] * size + p % size for p in range(start, end)]

    def _gather_index(self, tables: list[tuple[int, ...]], span: int) -> torch.Tensor:
        """The pool rows (flat, ``rows * span``) of positions ``0..span-1`` of each block table
        (short tables padded with the zero block; the attention mask hides those positions)."""
        width = -(-span // self.block_size)
        padded = [list(t[:width]) + [0] * (width - len(t[:width])) for t in tables]
        table = torch.tensor(padded, device=self.device, dtype=torch.long)
        index = table[:, :, None] * self.block_size + self._offsets
        return index.view(len(tables), -1)[:, :span].reshape(-1)

    # -- weights -------------------------------------------------------------------------------

    def _matmul_weights(self) -> list[torch.Tensor]:
        weights = []
        for index, layer in enumerate(self.layers):
            mlp = layer.mlp
            weights += [self._qkv[index][0], layer.self_attn.o_proj.weight]
            weights += [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
        return [*weights, self.model.lm_head.weight]

    def _pack_weights(self) -> None:
        """A oneDNN-blocked copy of every matmul weight, for CPU steps.

        MKL's plain fp32 GEMM repacks the weight on every call, and at a few rows that
        repacking is most of the cost. Which is faster depends on the CPU: on an Intel Xeon
        packed won from 4 to 32 rows only; on an AMD EPYC (where MKL takes a generic path) it
        won at every size, 2x at one row (the 30 layers' matmuls: 14 against 28 ms). So each
        step size is timed at load (:meth:`_time_packed`). The price is one more copy of the
        weights in memory; ``LLM_CPU_PACKED_WEIGHTS=false`` turns it off.
        """
        try:
            for weight in self._matmul_weights():
                self._packed[id(weight)] = torch.ops.mkldnn._reorder_linear_weight(
                    weight.detach(), _PACK_HINT
                )
        except (RuntimeError, AttributeError) as exc:  # a torch built without oneDNN
            logger.warning("packed CPU weights unavailable (%s); using plain matmuls", exc)
            self._packed.clear()

    def _time_packed(self, trials: int = 2) -> list[tuple[int, bool]]:
        """For each of :data:`_TUNED_ROWS`, whether packed matmuls beat plain ones here.

        Small steps are bound by reading the weights, so they are timed over all of them, as
        a step reads them (one layer again and again would sit in the cache); large ones are
        bound by arithmetic, and a few layers tell. About a second at load."""
        weights = self._matmul_weights()
        choices = []
        for rows in _TUNED_ROWS:
            sample = weights if rows <= 32 else weights[:10]
            inputs = [torch.randn(rows, w.shape[1], dtype=self.dtype) for w in sample]

            def plain(sample=sample, inputs=inputs):
                for w, x in zip(sample, inputs, strict=True):
                    F.linear(x, w)

            def packed(sample=sample, inputs=inputs):
                for w, x in zip(sample, inputs, strict=True):
                    torch.ops.mkldnn._linear_pointwise(x, self._packed[id(w)], None, "none",
                                                       [], "")  # fmt: skip

            times = {}
            for name, run in (("plain", plain), ("packed", packed)):
                run()  # warm
                best = float("inf")
                for _ in range(trials):
                    started = time.perf_counter()
                    run()
                    best = min(best, time.perf_counter() - started)
                times[name] = best
            choices.append((rows, times["packed"] < times["plain"]))
        logger.info("packed CPU matmuls at step rows: %s",
                    [rows for rows, packed in choices if packed])  # fmt: skip
        return choices

    def _use_packed(self, rows: int) -> bool:
        choice = self._packed_for.get(rows)
        if choice is None:
            choice = False
            for at, packed in self._packed_at:
                if at > rows:
                    break
                choice = packed
            self._packed_for[rows] = choice
        return choice

    def _linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        packed = self._packed.get(id(weight))
        if packed is not None and self._use_packed(x.shape[0]):
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return F.linear(x, weight, bias)

    # -- forward -------------------------------------------------------------------------------

    def _norm(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm in one kernel where that is exact enough (fp32), else the module's own."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, module.weight.shape, module.weight, module.variance_epsilon)
        return module(x)

    @torch.inference_mode()
    def forward(self, work: list[Work]) -> torch.Tensor:
        dev = self.device
        counts = [len(w.token_ids) for w in work]
        flat_ids = torch.tensor([t for w in work for t in w.token_ids], device=dev)
        positions = torch.tensor(
            [w.position + i for w, n in zip(work, counts, strict=True) for i in range(n)],
            device=dev,
        )
        # Where each token's K/V goes in the pool.
        write_at = torch.tensor(
            [i for w, n in zip(work, counts, strict=True)
             for i in self._pool_index(w.blocks, w.position, w.position + n)],
            device=dev,
        )  # fmt: skip
        top = max(w.position + n for w, n in zip(work, counts, strict=True))
        cos, sin = self._rope(positions, top)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads

        # Decode rows (one token each) attend as one padded batch over their block tables;
        # prefill chunks attend one by one, causally.
        starts, offset = [], 0
        for n in counts:
            starts.append(offset)
            offset += n
        decode = [i for i, n in enumerate(counts) if n == 1 and work[i].position > 0]
        prefill = [i for i in range(len(work)) if i not in set(decode)]
        if decode:
            # A decode-only step (the common one) needs no gather of its rows.
            all_decode = len(decode) == len(work)
            dec_rows = torch.tensor([starts[i] for i in decode], device=dev, dtype=torch.long)
            span = max(work[i].position for i in decode) + 1
            lengths = torch.tensor([work[i].position + 1 for i in decode], device=dev)
            dec_index = self._gather_index([work[i].blocks for i in decode], span)
            visible = torch.arange(span, device=dev)[None, :] < lengths[:, None]
            # Additive, made once per step (a boolean mask is converted in every layer).
            dec_mask = torch.zeros(visible.shape, dtype=self.dtype, device=dev)
            dec_mask = dec_mask.masked_fill_(~visible, float("-inf"))[:, None, None]
        earlier = {  # the pool rows of what a later prompt chunk attends to besides itself
            i: torch.tensor(self._pool_index(work[i].blocks, 0, work[i].position), device=dev)
            for i in prefill
            if work[i].position > 0
        }

        x = self.model.model.embed_tokens(flat_ids)
        tokens = x.shape[0]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv_weight, qkv_bias = self._qkv[index]
            h = self._norm(layer.input_layernorm, x)
            qkv = self._linear(h, qkv_weight, qkv_bias)
            qk = qkv[:, : q_size + kv_size].reshape(tokens, self.heads + self.kv_heads, -1)
            v = qkv[:, q_size + kv_size :].reshape(tokens, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # qwen3 normalizes each head before the rotation
                qk = torch.cat(
                    (attn.q_norm(qk[:, : self.heads]), attn.k_norm(qk[:, self.heads :])), 1
                )
            qk = qk * cos + _rotate_half(qk) * sin  # queries and keys rotated together
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            pool = self._kv[index]  # [pool rows, 2, kv_heads, d]
            pool[write_at] = torch.stack((k, v), 1)

            out = torch.empty_like(q) if prefill else q
            if decode:
                # [rows, kv_heads, group, d] queries against [rows, kv_heads, span, d] keys:
                # the query heads of a group ride in the sequence dimension.
                q_dec = (q if all_decode else q[dec_rows]).view(
                    len(decode), self.kv_heads, self.group, self.head_dim
                )
                kv = pool.index_select(0, dec_index).view(
                    len(decode), span, 2, self.kv_heads, self.head_dim
                )
                o = F.scaled_dot_product_attention(
                    q_dec,
                    kv[:, :, 0].transpose(1, 2),
                    kv[:, :, 1].transpose(1, 2),
                    attn_mask=dec_mask,
                    scale=self.scale,
                ).reshape(len(decode), self.heads, self.head_dim)
                if all_decode:
                    out = o
                else:
                    out[dec_rows] = o
            for i in prefill:
                w, n, s = work[i], counts[i], starts[i]
                qi = q[s : s + n].transpose(0, 1)[None]
                ki, vi = k[s : s + n], v[s : s + n]
                if w.position == 0:
                    mask, causal = None, True
                else:  # the cached positions before this chunk, then the chunk itself
                    before = pool.index_select(0, earlier[i])
                    ki = torch.cat((before[:, 0], ki))
                    vi = torch.cat((before[:, 1], vi))
                    end = w.position + n
                    key_pos = torch.arange(end, device=dev)[None, :]
                    query_pos = torch.arange(w.position, end, device=dev)[:, None]
                    mask, causal = key_pos <= query_pos, False
                o = F.scaled_dot_product_attention(
                    qi, ki.transpose(0, 1)[None], vi.transpose(0, 1)[None],
                    attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True,
                )  # fmt: skip
                out[s : s + n] = o[0].transpose(0, 1)
            x = x + self._linear(
                out.view(tokens, self.heads * self.head_dim), attn.o_proj.weight, attn.o_proj.bias
            )
            h = self._norm(layer.post_attention_layernorm, x)
            gate = mlp.act_fn(self._linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias))
            up = self._linear(h, mlp.up_proj.weight, mlp.up_proj.bias)
            x = x + self._linear(gate * up, mlp.down_proj.weight, mlp.down_proj.bias)

        last = [starts[i] + counts[i] - 1 for i in range(len(work)) if work[i].want_logits]
        if not last:
            return x.new_empty(0, self.vocab_size)
        hidden = self._norm(self.model.model.norm, x[torch.tensor(last, device=dev)])
        return self._lm_head(hidden).float()

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits. Without packed weights, MKL multiplies 6 to 15 rows by the wide vocabulary
        matrix far more slowly than 16 (8 rows: 8.4 ms, padded to 16: 6.4 ms), so such
        batches are padded."""
        rows, weight = hidden.shape[0], self.model.lm_head.weight
        packed = id(weight) in self._packed and self._use_packed(rows)
        if packed or self.device.type != "cpu" or not 6 <= rows < 16:
            return self._linear(hidden, weight, self.model.lm_head.bias)
        padded = hidden.new_zeros(16, hidden.shape[1])
        padded[:rows] = hidden
        return F.linear(padded, weight, self.model.lm_head.bias)[:rows]


class SequentialHF:
    """Any Hugging Face causal LM: a DynamicCache per slot, one forward call per item.

    Its caches grow per sequence; the scheduler still admits by the same budget
    (``num_blocks`` of ``block_size`` positions), counted but not shared."""

    paged = False

    def __init__(
        self, model: Any, *, max_slots: int, context_length: int, num_blocks: int,
        block_size: int = 16,
    ):  # fmt: skip
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.model = model
        self.max_slots = max_slots
        self.context_length = context_length
        self.vocab_size = model.config.vocab_size
        self.device = model.device
        self._caches: dict[int, Any] = {}

    @torch.inference_mode()
    def forward(self, work: list[Work]) -> torch.Tensor:
        rows = []
        for w in work:
            if w.position == 0:
                self._caches.pop(w.slot, None)
            ids = torch.tensor([w.token_ids], device=self.device)
            out = self.model(
                input_ids=ids,
                past_key_values=self._caches.get(w.slot),
                use_cache=True,
                logits_to_keep=1,  # a prompt chunk needs the last position's logits only
            )
            self._caches[w.slot] = out.past_key_values
            if w.want_logits:
                rows.append(out.logits[0, -1].float())
        if not rows:
            return torch.empty(0, self.vocab_size, device=self.device)
        return torch.stack(rows)

    def release(self, slot: int) -> None:
        self._caches.pop(slot, None)

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.model.config, self.model.dtype)

    def cache_bytes(self) -> int:
        total = 0
        for cache in self._caches.values():
            for layer in getattr(cache, "layers", []):
                for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if tensor is not None:
                        total += tensor.numel() * tensor.element_size()
        return total


def build_batch_model(
    model: Any,
    *,
    backend: str,
    max_slots: int,
    context_length: int,
    kv_budget_bytes: int,
    block_size: int = 16,
    packed_weights: bool = True,
) -> BatchModel:
    """``paged`` (Llama family), ``transformers`` (anything), or ``auto``: paged when it can.

    The KV memory is ``kv_budget_bytes`` cut into blocks of ``block_size`` positions."""
    if backend not in ("auto", "paged", "transformers"):
        raise ValueError(f"unknown backend {backend!r}: auto, paged or transformers")
    if backend == "auto":
        reason = native_support(model.config)
        backend = "transformers" if reason else "paged"
        if reason:
            logger.warning("Falling back to the unbatched transformers path: %s", reason)
    per_block = kv_bytes_per_token(model.config, model.dtype) * block_size
    num_blocks = kv_budget_bytes // per_block
    if num_blocks < 2:
        raise ValueError(
            f"the KV budget ({kv_budget_bytes} bytes) holds less than one block of "
            f"{block_size} tokens ({per_block} bytes)"
        )
    if backend == "paged":
        return PagedLlama(
            model, max_slots=max_slots, context_length=context_length, num_blocks=num_blocks,
            block_size=block_size, packed_weights=packed_weights,
        )  # fmt: skip
    return SequentialHF(
        model, max_slots=max_slots, context_length=context_length, num_blocks=num_blocks,
        block_size=block_size,
    )  # fmt: skip
