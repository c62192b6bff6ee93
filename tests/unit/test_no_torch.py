"""logic/ works in a process where importing torch fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers", "bentoml"}:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockTorch())
    try:
        import torch
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker did not work")

    from logic.chat import CompletionService
    from logic.model_files import ModelFiles
    from contract.tokens import GenerationChunk
    from logic.protocol import ChatCompletionRequest
    from logic.settings import APISettings

    files = ModelFiles.load(sys.argv[1])
    answer = files.tokenizer.encode("Paris") + files.eos_token_ids

    async def generate(prompt_ids, params):
        for token in answer:
            yield GenerationChunk(
                token_ids=[token], finish_reason="stop" if token in params.stop_token_ids else None
            )

    service = CompletionService(files, APISettings(model="tiny"), generate)
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "Capital of France?"}])
    response = asyncio.run(service.create(request))
    assert response.choices[0].message.content == "Paris", response
    heavy = {"torch", "transformers", "bentoml"}
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
    assert not loaded, loaded
    print("OK", response.usage.total_tokens)
    """
)


def test_logic_runs_where_torch_cannot_be_imported(tiny_tokenizer_dir: Path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_tokenizer_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK ")
