"""Structured outputs for the native engine: JSON schemas compiled to token masks by xgrammar.

A request with :class:`~contract.tokens.StructuredOutput` gets a grammar compiled against the
model's tokenizer (cached by the schema's text, by xgrammar's compiler) and a matcher of its
own. At each step the engine asks the matcher which tokens keep the answer valid, masks the
others out of that row's logits before sampling, and feeds the chosen token back. Once the
JSON value is complete only the request's stop tokens are allowed, so the answer ends there.

The JSON is compact (no free whitespace) and strict (no properties or items the schema does
not name): a small model given room to wander inside a valid prefix does, until its token
budget runs out.

xgrammar is the grammar engine vLLM uses too; we do not write our own. Compiling runs on a
worker thread, bounded in time; a schema it cannot compile is the client's 400. Nothing here
imports torch (:mod:`runners.xgr`): the masks are applied by the engine's sampler, to torch
tensors (:mod:`runners.sampling`) or numpy arrays (:mod:`runners.host_sampling`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
from pathlib import Path
from typing import Any

from contract.errors import EngineRequestError
from contract.tokens import StructuredOutput
from runners import xgr
from runners.closing import ClosingOptions, ClosingSearch, Guard

# How long a schema may take to compile before the request is refused; xgrammar compiles
# ordinary schemas in milliseconds, pathological ones (deep nesting, huge enums) take longer.
COMPILE_TIMEOUT_S = 10.0
CACHE_LIMIT_BYTES = 256 << 20  # compiled grammars kept (xgrammar's cache), least recent out
_ANY_OBJECT = '{"type": "object"}'
_SOURCE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class Grammars:
    """Compiles and caches grammars for one model's tokenizer; makes matchers."""

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int, *, timeout: float | None = None):
        self._tokenizer_dir = str(tokenizer_dir)
        self._vocab_size = vocab_size
        self._timeout = timeout or COMPILE_TIMEOUT_S
        self._compiler: xgr.GrammarCompiler | None = None
        self._decoded_vocab: list[bytes] = []
        self._search: ClosingSearch | None = None
        self.special_ids: list[int] = []  # never in an answer (but stop tokens at its end)
        self._lock = threading.Lock()
        # One compiling thread: a runaway schema holds it, not the engine or the event loop.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar")

    def _get_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                # The tokenizer.json as transformers reads it, not through AutoTokenizer:
                # its lookup of the model's class imports torch wherever torch is installed.
                from transformers import PreTrainedTokenizerFast

                tokenizer = PreTrainedTokenizerFast.from_pretrained(self._tokenizer_dir)
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self._vocab_size)
                # Tokens a compact JSON answer never holds, which xgrammar 0.2.8 would allow:
                # special tokens (read as their literal text, so "<|im_start|>" could sit in a
                # string), and raw control characters, which it lets into strings although
                # JSON forbids them there (strict parsers, Python's and browsers', refuse
                # them; the escaped forms stay allowed).
                special = {i for i in tokenizer.all_special_ids if 0 <= i < self._vocab_size}
                control = {
                    i for i, raw in enumerate(info.decoded_vocab)
                    if i < self._vocab_size and any(byte < 0x20 for byte in raw)
                }  # fmt: skip
                self.special_ids = sorted(special | control)
                self._decoded_vocab = list(info.decoded_vocab[: self._vocab_size])
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=1, cache_limit_bytes=CACHE_LIMIT_BYTES
                )
            return self._compiler

    def compile(self, spec: StructuredOutput) -> Any:
        """The grammar for ``spec`` (blocking; cached by the schema's or the tag's text)."""
        if spec.kind == "structural_tag":
            return self._get_compiler().compile_structural_tag(spec.structural_tag or "")
        schema = spec.json_schema if spec.kind == "json_schema" and spec.json_schema else None
        return self._get_compiler().compile_json_schema(
            schema or _ANY_OBJECT, any_whitespace=False, separators=(",", ":"), strict_mode=True
        )

    async def matcher(self, spec: StructuredOutput, stop_ids: list[int]) -> Constraint:
        """A matcher for one request; :class:`EngineRequestError` (a 400) when the schema
        cannot be compiled, or not within the time limit."""
        loop = asyncio.get_running_loop()
        what = "tools' schemas" if spec.kind == "structural_tag" else "JSON schema"
        try:
            compiled = await asyncio.wait_for(
                loop.run_in_executor(self._pool, self.compile, spec), self._timeout
            )
        except asyncio.TimeoutError:
            raise EngineRequestError(
                f"The {what} did not compile within {self._timeout:g} s; simplify it.",
                param=spec.param,
            ) from None
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = _SOURCE_PREFIX.sub("", str(exc)).strip()  # "[time] file.cc:94: ..."
            raise EngineRequestError(
                f"The {what} cannot be used for constrained decoding: {reason}",
                param=spec.param,
            ) from None
        matcher = xgr.new_matcher(compiled, override_stop_tokens=list(stop_ids) or None)
        ends = set(matcher.stop_token_ids)  # the request's stop ids, else the tokenizer's EOS
        return Constraint(matcher, [i for i in self.special_ids if i not in ends])

    async def guard(
        self, spec: StructuredOutput, stop_ids: list[int], *, budget: int, options: ClosingOptions
    ) -> Guard:
        """A closing guard with a matcher of its own, for an engine whose matcher is out of
        reach (vLLM): it follows the same grammar, compiled the same way."""
        constraint = await self.matcher(spec, stop_ids)
        return self.guard_on(constraint, budget=budget, options=options)

    def guard_on(self, constraint: Constraint, *, budget: int, options: ClosingOptions) -> Guard:
        """A closing guard over ``constraint``'s own matcher (the native engine's)."""
        if self._search is None:
            self._search = ClosingSearch(self._decoded_vocab, self.special_ids)
        return Guard(constraint.matcher, self._search, budget=budget, options=options)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Constraint:
    """One request's grammar state, and the special tokens it may never produce."""

    def __init__(self, matcher: Any, never: list[int]):
        self.matcher = matcher
        self.never = never

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def fill(self, bitmask: Any, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]``
        (:func:`runners.bitmask.allocate_bitmask`); the special tokens in :attr:`never` are the
        sampler's to rule out."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def done(self) -> bool:
        """The answer is complete (a stop token was accepted after the whole value)."""
        return self.matcher.is_terminated()
