"""llama.cpp as the model behind our engine: the GGUF as shipped, on llama.cpp's CPU kernels.

:class:`LlamaCppModel` is a :class:`runners.batch_model.BatchModel`: each step of
:class:`runners.engine.GenerationEngine` (ours: continuous batching, admission, limits,
cancellation, sampling, penalties, logprobs, grammars and the closing guard, metrics) is one
``llama_decode`` of every sequence's tokens together, through the low-level API of the
``llama-cpp-python`` bindings. llama.cpp computes logits; everything else is the engine the
other paths share, so a request behaves the same on either (docs/engines.md).

Why the bindings and not llama.cpp's own server as a process: the server samples itself
(its own penalty, logprob and grammar semantics, GBNF instead of our xgrammar masks and
closing guard), so each guarantee would be a translation, and a token-by-token HTTP hop
costs more than its scheduler saves; measured side by side in docs/benchmarks.md.

The KV cache is llama.cpp's, one sequence id per batch slot, unified (``kv_unified``) so
sequences share cells: a prompt that starts like a sequence already in the cache (running,
or finished and not yet overwritten) gets that prefix by ``llama_memory_seq_cp``, which adds
a sequence id to the cells and copies nothing (:meth:`reuse`). A slot keeps its finished
sequence's KV until the slot is reused, the cells are needed (:meth:`_make_room`) or the
finished sequences kept pass their budget. Then it is saved to host memory
(:mod:`runners.host_cache`, ``llama_state_seq_get_data``), and a later prompt that starts the
same way gets it back by a copy (``llama_state_seq_set_data``) instead of computing it again.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.engine import Series
from runners.host_cache import HostPromptCache
from runners.kv_blocks import common_prefix
from runners.work import Work

logger = logging.getLogger(__name__)

_F16_BYTES = 2  # llama.cpp's KV cells are f16 unless told otherwise
_KEPT_SHARE = 0.25  # of a decode step's weight work, what kept cells may add by default
_HOST_CACHE_MAX = 8 << 30  # default host memory for saved sequences at most (llama-server's)
_init_lock = threading.Lock()
_backend_ready = False


def find_gguf(model_dir: str | Path) -> Path | None:
    """The GGUF file a store entry keeps beside its safetensors, if any."""
    found = sorted(Path(model_dir).glob("*.gguf"))
    return found[0] if found else None


def _bindings():
    """llama-cpp-python's ctypes bindings to llama.cpp's C API (``llama_cpp.llama_cpp``).

    Imported without running the package's ``__init__``, which also loads the high-level
    ``Llama`` class and with it diskcache, sqlite3 and jinja2's sandbox: 2.9 MiB of the
    runner's memory for code this engine never calls (it drives the C API itself). Where
    the package was already imported whole, that is used as it is."""
    if "llama_cpp" not in sys.modules:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("No module named 'llama_cpp'")
        # The package as a namespace: its submodules import, its __init__ does not run.
        sys.modules["llama_cpp"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("llama_cpp.llama_cpp")


def _quiet_logs(lib) -> None:
    """llama.cpp logs every load step to stderr; keep its warnings and errors only, through
    our logger."""

    @lib.llama_log_callback
    def callback(level, text, _user):  # GGML_LOG_LEVEL: 2 info, 3 warn, 4 error, 5 more
        if level in (3, 4) and text and text.strip():
            logger.warning("llama.cpp: %s", text.decode(errors="replace").rstrip())

    lib.llama_log_set(callback, ctypes.c_void_p())
    _quiet_logs.callback = callback  # keep it alive as long as the library may call it


@dataclass
class _Batch:
    """A ``llama_batch`` whose arrays are numpy buffers we own, filled a slice at a time."""

    capacity: int
    token: np.ndarray = field(init=False)
    pos: np.ndarray = field(init=False)
    n_seq: np.ndarray = field(init=False)
    seq: np.ndarray = field(init=False)
    logits: np.ndarray = field(init=False)
    seq_ptrs: object = field(init=False)

    def __post_init__(self) -> None:
        self.token = np.zeros(self.capacity, dtype=np.int32)
        self.pos = np.zeros(self.capacity, dtype=np.int32)
        self.n_seq = np.ones(self.capacity, dtype=np.int32)
        self.seq = np.zeros(self.capacity, dtype=np.int32)
        self.logits = np.zeros(self.capacity, dtype=np.int8)
        # seq_id is an array of pointers, one per token, each to that token's sequence ids:
        # here, one id each, in ``seq``.
        base = self.seq.ctypes.data
        pointers = (ctypes.POINTER(ctypes.c_int32) * self.capacity)()
        for i in range(self.capacity):
            pointers[i] = ctypes.cast(base + 4 * i, ctypes.POINTER(ctypes.c_int32))
        self.seq_ptrs = pointers

    def struct(self, lib, n_tokens: int):
        batch = lib.llama_batch()
        batch.n_tokens = n_tokens
        batch.token = self.token.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        batch.embd = ctypes.POINTER(ctypes.c_float)()
        batch.pos = self.pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        batch.n_seq_id = self.n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        batch.seq_id = ctypes.cast(self.seq_ptrs, type(batch.seq_id))
        batch.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        return batch


class LlamaCppModel:
    """One llama.cpp context over a GGUF: ``max_slots`` sequences, ``kv_tokens`` cells."""

    paged = False  # the engine's block pool only budgets the cells; llama.cpp places them
    simulated = False

    def __init__(
        self,
        gguf: str | Path,
        *,
        max_slots: int,
        max_step_tokens: int,
        kv_tokens: int | None,
        block_size: int,
        threads: int | None = None,
        flash_attention: bool = True,
        keep_tokens: int | None = None,
        host_cache_bytes: int = 0,
    ):
        global _backend_ready
        try:
            lib = _bindings()  # the compiled library: this engine only
        except ImportError as exc:
            raise RuntimeError(
                "LLM_ENGINE=llamacpp needs llama-cpp-python, which is not installed here: "
                "`make ENGINE=llamacpp install` builds it (deploy/llamacpp-wheel.sh)"
            ) from exc

        self._lib = lib
        with _init_lock:
            if not _backend_ready:
                _quiet_logs(lib)
                lib.llama_backend_init()
                _backend_ready = True
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self._model = lib.llama_model_load_from_file(str(gguf).encode(), model_params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.gguf = Path(gguf)
        self.vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model))
        self.context_length = lib.llama_model_n_ctx_train(self._model)
        layers = lib.llama_model_n_layer(self._model)
        heads = lib.llama_model_n_head(self._model)
        kv_heads = lib.llama_model_n_head_kv(self._model)
        head_dim = lib.llama_model_n_embd(self._model) // heads
        self._per_token = layers * 2 * kv_heads * head_dim * _F16_BYTES
        # Finished sequences kept in the cells for prefix reuse: each decode step's attention
        # spans the cells in use (up to the highest), so kept cells slow every step. With
        # host memory to save them to (and copy them back from in a millisecond), none are
        # kept by default: measured served, 1 client, SmolLM2-135M, 2 cores, 973 kept tokens
        # made a decode 14.2 ms a token, none 12.0. Without it, they may cost a quarter of
        # the step's weight work: a cell costs about 2 x heads x head_dim per layer, a step
        # about one multiply-add per weight (973 tokens for SmolLM2-135M).
        per_cell = layers * heads * head_dim * 2
        self.keep_tokens = (
            keep_tokens if keep_tokens is not None
            else 0 if host_cache_bytes
            else int(_KEPT_SHARE * lib.llama_model_n_params(self._model) / per_cell)
        )  # fmt: skip
        cells = kv_tokens or self.context_length
        self.block_size = block_size
        self.num_blocks = max(2, cells // block_size)
        self.max_slots = max_slots
        self.threads = threads or len(os.sched_getaffinity(0))
        step = max(max_step_tokens, max_slots)
        params = lib.llama_context_default_params()
        params.n_ctx = self.num_blocks * block_size
        params.n_batch = step
        params.n_ubatch = step  # one step, one graph: no split into micro-batches
        params.n_seq_max = max_slots
        # A step wants one sequence's logits at most (its last token's), so the graph's
        # output is reserved for max_slots rows, not for n_batch: 21.5 MiB of compute buffer
        # instead of 98 for SmolLM2-135M's 49,152-token vocabulary (llama-server does this).
        params.n_outputs_max = max_slots
        params.n_outputs_max_per_seq = 1
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.kv_unified = True  # shared prefixes share cells; any sequence may use any cell
        params.no_perf = True
        off = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attention else off
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not make a context of {params.n_ctx} cells")
        self._memory = lib.llama_get_memory(self._ctx)
        self._batch = _Batch(step)
        # The token ids whose KV each sequence holds, position by position.
        self._held: list[list[int]] = [[] for _ in range(max_slots)]
        self._live: set[int] = set()
        self._last_used = [0] * max_slots  # when each slot last took a prompt (a counter)
        self._prompt_len = [0] * max_slots  # how much of each sequence was its prompt
        self._uses = 0
        self.reused_tokens = 0
        self.host = HostPromptCache(host_cache_bytes, block_size) if host_cache_bytes else None
        self._state = lib.LLAMA_STATE_SEQ_FLAGS_NONE

    # -- BatchModel ------------------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        return self._per_token

    def cache_bytes(self) -> int:
        return self.num_blocks * self.block_size * self._per_token

    def forward(self, work: list[Work]) -> np.ndarray:
        n = sum(len(w.token_ids) for w in work)
        if n > self._batch.capacity:
            raise ValueError(f"a step of {n} tokens exceeds the batch of {self._batch.capacity}")
        b = self._batch
        at = 0
        for w in work:
            held = self._held[w.slot]
            if len(held) > w.position:  # an older sequence's tail: not this one's
                self._lib.llama_memory_seq_rm(self._memory, w.slot, w.position, -1)
                del held[w.position :]
            elif len(held) < w.position:
                raise RuntimeError(
                    f"slot {w.slot} holds {len(held)} positions, the step starts at {w.position}"
                )
            end = at + len(w.token_ids)
            b.token[at:end] = w.token_ids
            b.pos[at:end] = np.arange(w.position, w.position + len(w.token_ids))
            b.seq[at:end] = w.slot
            b.logits[at:end] = 0
            b.logits[end - 1] = 1 if w.want_logits else 0
            at = end
            self._live.add(w.slot)
        status = self._decode(n)
        if status == 1:  # no room for the batch: finished sequences' KV goes, then again
            self._make_room()
            status = self._decode(n)
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status})")
        for w in work:
            self._held[w.slot] += w.token_ids
        outputs = int(b.logits[:n].sum())
        if outputs == 0:
            return np.empty((0, self.vocab_size), dtype=np.float32)
        pointer = self._lib.llama_get_logits(self._ctx)
        logits = np.ctypeslib.as_array(pointer, shape=(outputs, self.vocab_size))
        return logits.copy()  # llama.cpp reuses its buffer next step

    def release(self, slot: int) -> None:
        """The sequence is done: its KV stays, for a later prompt that starts the same way,
        until the slot is reused, the cells are needed, or the finished sequences kept hold
        more than ``keep_tokens`` (the least recently used go first)."""
        self._live.discard(slot)
        kept = sorted(
            (s for s in range(self.max_slots) if s not in self._live and self._held[s]),
            key=lambda s: self._last_used[s],
        )
        total = sum(len(self._held[s]) for s in kept)
        for old in kept:
            if total <= self.keep_tokens:
                break
            total -= len(self._held[old])
            self._drop(old)

    def extra_metrics(self) -> list[Series]:
        """The host-memory cache's series (the engine adds them to its own)."""
        host = self.host
        if host is None:
            return []
        return [
            Series("host_cache_bytes", "gauge",
                   "Host memory held by finished sequences' saved KV.", host.bytes),
            Series("host_cache_budget_bytes", "gauge",
                   "Host memory the saved KV may hold (LLM_LLAMACPP_HOST_CACHE_MIB).",
                   host.budget),
            Series("host_cache_sequences", "gauge", "Finished sequences saved.", len(host)),
            Series("host_cache_saved_total", "counter",
                   "Finished sequences saved as they left the cells.", host.stats.saved),
            Series("host_cache_evicted_total", "counter",
                   "Saved sequences dropped for the budget.", host.stats.evicted),
            Series("host_cache_restores_total", "counter",
                   "Prompts whose prefix was copied back from host memory.",
                   host.stats.restores),
            Series("host_cache_restored_tokens_total", "counter",
                   "Prompt tokens copied back from host memory (not computed).",
                   host.stats.restored_tokens),
        ]  # fmt: skip

    # -- prefix reuse (the engine asks at admission) ----------------------------------------

    def choose_slot(self, free: list[int], prompt_ids: list[int]) -> int:
        """The free slot for a new prompt: one that holds the whole prompt already (a repeat:
        it is computed there as it was the first time); else the one whose kept sequence
        loses fewest tokens when the prompt overwrites it (an empty slot, or one whose
        sequence the prompt continues, loses none; of those, the one it continues, in
        place), the least recently used among equals.

        What the prompt shares with any other sequence is copied over by :meth:`reuse`, so
        the slot that holds the prompt's longest prefix need not be the one it takes: taking
        it merely because every kept sequence starts with the same system prompt overwrote
        the last answer's sequence each time, and a prompt seen a few requests before was
        computed again (17 of 41 tokens found, measured).
        """

        def lost(slot: int) -> tuple[int, int, int]:
            held = self._held[slot]
            common = common_prefix(held, prompt_ids)
            if common >= len(prompt_ids) - 1:
                return -1, -common, 0  # a repeat of its prompt
            return len(held) - common, -common, self._last_used[slot]

        slot = min(free, key=lost)
        self._uses += 1
        self._last_used[slot] = self._uses
        return slot

    def reuse(self, slot: int, prompt_ids: list[int]) -> int:
        """Make ``slot`` hold the longest prefix of ``prompt_ids`` (all but its last token,
        whose logits are needed) any sequence holds, in the cells or saved in host memory;
        return its length."""
        limit = len(prompt_ids) - 1
        own = min(common_prefix(self._held[slot], prompt_ids), limit)
        donor, donor_len = slot, own
        for other in range(self.max_slots):
            if other != slot:
                common = min(common_prefix(self._held[other], prompt_ids), limit)
                if common > donor_len:
                    donor, donor_len = other, common
        if len(self._held[slot]) > own:  # the slot's kept sequence goes: to host memory first
            self._save(slot)
        restored = self._restore(slot, prompt_ids, limit, better_than=donor_len)
        self._prompt_len[slot] = len(prompt_ids)
        if restored > 0:
            return restored
        if restored < 0:  # the slot was emptied for a copy that found no room
            own = 0
            donor_len = 0 if donor == slot else donor_len
        lib, memory = self._lib, self._memory
        if donor == slot:
            lib.llama_memory_seq_rm(memory, slot, own, -1)
        else:
            lib.llama_memory_seq_rm(memory, slot, -1, -1)
            lib.llama_memory_seq_cp(memory, donor, slot, 0, donor_len)
        self._held[slot] = list(prompt_ids[:donor_len])
        self.reused_tokens += donor_len
        return donor_len

    # -- host memory (runners.host_cache) --------------------------------------------------

    def _save(self, slot: int) -> None:
        """Copy the finished sequence in ``slot`` to host memory, unless it is there already
        (or too short to be worth it)."""
        held, host = self._held[slot], self.host
        if host is None or len(held) < self.block_size or host.covers(held):
            return
        lib = self._lib
        size = lib.llama_state_seq_get_size_ext(self._ctx, slot, self._state)
        if size > host.budget:
            return
        data = np.empty(size, dtype=np.uint8)
        pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if lib.llama_state_seq_get_data_ext(self._ctx, pointer, size, slot, self._state) == size:
            host.add(held, data, self._prompt_len[slot] or None)

    def _restore(self, slot: int, prompt_ids: list[int], limit: int, better_than: int) -> int:
        """Copy into ``slot`` the saved sequence sharing the longest head with the prompt, if
        it shares more than ``better_than`` tokens (what the cells hold); return the tokens it
        gives (0: none; -1: none, and the slot was emptied for it, since the cells had no room
        for the copy)."""
        if self.host is None:
            return 0
        entry, common = self.host.find(prompt_ids)
        common = min(common, limit)
        if entry is None or common <= better_than:
            return 0
        self._drop(slot)
        lib = self._lib
        pointer = entry.data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        size = entry.data.nbytes
        if lib.llama_state_seq_set_data_ext(self._ctx, pointer, size, slot, self._state) != size:
            lib.llama_memory_seq_rm(self._memory, slot, -1, -1)  # no room: computed instead
            return -1
        lib.llama_memory_seq_rm(self._memory, slot, common, -1)
        self._held[slot] = list(prompt_ids[:common])
        self.host.stats.restores += 1
        self.host.stats.restored_tokens += common
        self.reused_tokens += common
        return common

    # -- internals -------------------------------------------------------------------------

    def _drop(self, slot: int) -> None:
        """A finished sequence leaves the cells: to host memory first, where there is one."""
        if self._held[slot]:
            self._save(slot)
            self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
            self._held[slot] = []

    def _decode(self, n: int) -> int:
        return self._lib.llama_decode(self._ctx, self._batch.struct(self._lib, n))

    def _make_room(self) -> None:
        """Drop the KV kept for finished sequences (cells shared with a live one stay)."""
        for slot in range(self.max_slots):
            if slot not in self._live:
                self._drop(slot)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            self._lib.llama_model_free(self._model)
            self._model = None


def default_host_cache_bytes() -> int:
    """A quarter of the memory this process may use (its cgroup's limit where it has one,
    else the host's), at most 8 GiB (llama-server's default --cache-ram)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
        break
    return min(total // 4, _HOST_CACHE_MAX)


def load_engine(
    model_dir: str | Path,
    *,
    threads: int | None,
    max_batch_size: int,
    max_batch_tokens: int,
    max_in_flight: int | None,
    kv_tokens: int | None,
    block_size: int,
    prefix_caching: bool,
    closing,
    streaming,
    keep_tokens: int | None = None,
    host_cache_mib: int | None = None,
):
    """Our engine over llama.cpp on the GGUF of a store entry (``LLM_ENGINE=llamacpp``)."""
    from runners.engine import GenerationEngine
    from runners.host_sampling import NumpySampler

    gguf = find_gguf(model_dir)
    if gguf is None:
        raise RuntimeError(
            f"{model_dir} holds no .gguf file for llama.cpp: import the model from its GGUF "
            "(`python -m runners.import_model --source FILE.gguf`; `make model` for the "
            "default model), or serve it with LLM_ENGINE=native"
        )

    host_cache_bytes = (
        0 if not prefix_caching  # nothing would look there
        else default_host_cache_bytes() if host_cache_mib is None
        else host_cache_mib << 20
    )  # fmt: skip

    def build() -> LlamaCppModel:
        return LlamaCppModel(
            gguf, max_slots=max_batch_size, max_step_tokens=max_batch_tokens,
            kv_tokens=kv_tokens, block_size=block_size, threads=threads,
            keep_tokens=keep_tokens, host_cache_bytes=host_cache_bytes,
        )  # fmt: skip

    engine = GenerationEngine(
        build,
        sampler=NumpySampler(),  # numpy on llama.cpp's logits: this process never loads torch
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        max_in_flight=max_in_flight,
        prefix_caching=prefix_caching,
        tokenizer_dir=model_dir,
        closing=closing,
        streaming=streaming,
        name="llamacpp",
    )
    model = engine.batch_model
    logger.info(
        "Loaded %s on llama.cpp (%d threads): batch <= %d sequences / %d tokens per step, "
        "KV %d cells (%.2f GiB), prefix reuse %s (finished sequences: %d tokens kept in "
        "the cells, then up to %d MiB in host memory)",
        gguf.name, model.threads, engine.max_batch_size, engine.max_batch_tokens,
        model.num_blocks * model.block_size, model.cache_bytes() / (1 << 30),
        "on" if prefix_caching else "off", model.keep_tokens, host_cache_bytes >> 20,
    )  # fmt: skip
    return engine
