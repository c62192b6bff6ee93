"""xgrammar for every engine, without torch in a process that has not loaded it.

xgrammar's compiler and matcher are C++, reached through tvm_ffi; its Python package wraps
them, and its ``matcher`` module (which ``xgrammar/__init__`` imports) imports torch for its
tensor helpers. An engine whose logits are host arrays (llama.cpp) needs none of them, and
importing torch would cost its runner process 215 MiB of resident memory (measured; a third
of the whole runner) and its image 754 MB.

So in a process where torch is not imported yet, the package is put together from its
modules that need no torch (its bindings, ``base``, ``grammar``, ``tokenizer_info``,
``compiler``), and :class:`_HostMatcher` wraps the same C++ matcher ``xgrammar.GrammarMatcher``
does. The package completes itself (runs its own ``__init__``, torch and all) the first time
anything asks it for a name only that provides, so code that uses xgrammar the usual way in
the same process still works. Where torch is loaded (our native engine, vLLM) this is plain
``import xgrammar`` and its own ``GrammarMatcher``: nothing changes there.

Bitmasks are numpy int32 arrays, ``[rows, ceil(vocab / 32)]``, xgrammar's layout; the
matcher fills them through DLPack, and the torch sampler wraps them without a copy.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

# xgrammar's own modules that import neither torch nor (through AutoTokenizer) transformers'
# model code; their order is xgrammar/__init__'s (the bindings load first).
_TORCH_FREE = ("exception", "load_binding", "base", "structural_tag", "grammar",
               "tokenizer_info", "compiler")  # fmt: skip


class _NoTorchFinder:
    """A meta path finder under which ``import torch`` fails, as where it is not installed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


_NO_TORCH = _NoTorchFinder()


def _import() -> ModuleType:
    if "xgrammar" in sys.modules or "torch" in sys.modules:
        import xgrammar

        return xgrammar
    spec = importlib.util.find_spec("xgrammar")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        raise ImportError("xgrammar is not installed")
    if "tvm_ffi" not in sys.modules:
        # tvm_ffi imports torch first thing when it can, against a symbol clash seen on
        # Windows only (its own comment); it goes on without it, as where none is installed.
        sys.meta_path.insert(0, _NO_TORCH)
        try:
            import tvm_ffi  # noqa: F401
        finally:
            sys.meta_path.remove(_NO_TORCH)
    package = importlib.util.module_from_spec(spec)  # its __init__ not run
    sys.modules["xgrammar"] = package
    try:
        for name in _TORCH_FREE:
            importlib.import_module(f"xgrammar.{name}")
    except BaseException:
        for name in [m for m in sys.modules if m == "xgrammar" or m.startswith("xgrammar.")]:
            del sys.modules[name]
        raise

    def complete(name: str) -> Any:  # PEP 562: only for names not set yet
        del package.__getattr__
        spec.loader.exec_module(package)  # xgrammar/__init__: the modules above are loaded
        return getattr(package, name)

    package.__getattr__ = complete  # type: ignore[method-assign]
    return package


xgrammar = _import()
_base = importlib.import_module("xgrammar.base")
GrammarCompiler = importlib.import_module("xgrammar.compiler").GrammarCompiler
TokenizerInfo = importlib.import_module("xgrammar.tokenizer_info").TokenizerInfo


class _HostMatcher(_base.XGRObject):
    """``xgrammar.GrammarMatcher``'s C++ object, with the methods our engines call, under the
    same names and arguments."""

    def __init__(self, compiled: Any, *, override_stop_tokens: list[int] | None = None):
        self._init_handle(
            _base._core.GrammarMatcher(compiled._handle, override_stop_tokens, False, -1, None)
        )

    def accept_token(self, token_id: int, *, debug_print: bool = False) -> bool:
        return self._handle.accept_token(token_id, debug_print)

    def fill_next_token_bitmask(
        self, bitmask: Any, index: int = 0, *, debug_print: bool = False
    ) -> bool:
        return self._handle.fill_next_token_bitmask(bitmask, index, debug_print)

    def find_jump_forward_string(self) -> str:
        return str(self._handle.find_jump_forward_string())

    def rollback(self, num_tokens: int = 1) -> None:
        self._handle.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self._handle.is_terminated()

    def is_completed(self) -> bool:
        return self._handle.is_completed()

    def fork(self) -> _HostMatcher:
        return _HostMatcher._create_from_handle(self._handle.fork())

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._handle.stop_token_ids())


def torch_free() -> bool:
    """Whether xgrammar was put together without torch in this process (and still is)."""
    return "GrammarMatcher" not in vars(xgrammar)  # vars: asking would complete it


def new_matcher(compiled: Any, *, override_stop_tokens: list[int] | None = None) -> Any:
    """A grammar matcher: xgrammar's own where its package is whole, else :class:`_HostMatcher`."""
    kind = _HostMatcher if torch_free() else xgrammar.GrammarMatcher
    return kind(compiled, override_stop_tokens=override_stop_tokens)
