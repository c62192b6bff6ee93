"""xgrammar without torch (runners/xgr.py), and the two samplers' grammar masks agreeing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from contract.tokens import StructuredOutput
from runners.host_sampling import NumpySampler
from runners.sampling import TorchSampler

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    from contract.tokens import StructuredOutput
    from runners import xgr
    from runners.grammar import Grammars
    from runners.host_sampling import NumpySampler

    assert xgr.torch_free(), "put together without torch"
    grammars = Grammars(sys.argv[1], vocab_size=int(sys.argv[2]))
    spec = StructuredOutput(kind="json_schema", json_schema='{"type": "object", '
        '"properties": {"a": {"type": "integer"}}, "required": ["a"]}')
    constraint = asyncio.run(grammars.matcher(spec, [2]))
    logits = np.zeros((1, int(sys.argv[2])), dtype=np.float32)
    NumpySampler().mask(logits, {0: constraint})
    allowed = int(np.isfinite(logits).sum())
    assert 0 < allowed < logits.shape[1], allowed
    fork = constraint.matcher.fork()
    assert type(fork) is type(constraint.matcher) and not fork.is_terminated()
    assert "torch" not in sys.modules, "torch was imported"
    import xgrammar
    assert xgrammar.GrammarMatcher  # the package completes itself when asked
    assert "torch" in sys.modules and not xgr.torch_free()
    print("OK", allowed)
    """
)


def test_xgrammar_compiles_and_masks_in_a_process_that_never_imports_torch(tiny_tokenizer_dir):
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json")).get_vocab_size()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_tokenizer_dir), str(vocab)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")


def test_the_torch_and_numpy_samplers_mask_the_same_tokens(tiny_tokenizer_dir):
    from tokenizers import Tokenizer

    from runners.grammar import Grammars

    vocab = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json")).get_vocab_size()
    grammars = Grammars(tiny_tokenizer_dir, vocab_size=vocab)
    spec = StructuredOutput(kind="json_schema", json_schema='{"type": "object", "properties": '
                            '{"n": {"enum": ["x", "yy"]}}, "required": ["n"]}')  # fmt: skip
    constraints = [asyncio.run(grammars.matcher(spec, [2])) for _ in range(2)]
    base = torch.randn(3, vocab)
    on_torch, on_numpy = base.clone(), base.numpy().copy()
    TorchSampler(torch.device("cpu")).mask(on_torch, {1: constraints[0]})
    NumpySampler().mask(on_numpy, {1: constraints[1]})
    assert np.array_equal(np.isfinite(on_torch.numpy()), np.isfinite(on_numpy))
    assert np.isfinite(on_numpy[[0, 2]]).all()  # rows without a grammar untouched
    assert 0 < np.isfinite(on_numpy[1]).sum() < vocab
    grammars.close()


def test_the_grammars_tokenizer_reads_as_autotokenizers_does(tiny_tokenizer_dir):
    """The grammar's tokenizer is read without AutoTokenizer (whose lookup imports torch):
    xgrammar sees the same vocabulary, kind, prefix space and stop tokens as from
    AutoTokenizer, which vLLM's own grammars are built from."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from runners.xgr import TokenizerInfo

    infos = [
        TokenizerInfo.from_huggingface(kind.from_pretrained(tiny_tokenizer_dir))
        for kind in (AutoTokenizer, PreTrainedTokenizerFast)
    ]
    for field in ("vocab_type", "vocab_size", "add_prefix_space", "stop_token_ids",
                  "decoded_vocab"):  # fmt: skip
        assert getattr(infos[0], field) == getattr(infos[1], field), field
