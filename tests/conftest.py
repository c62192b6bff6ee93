"""Test set-up: an isolated BentoML home holding a tiny random chat model.

In-process tests (runner, service) use the tiny model from a temporary model store. The
end-to-end tests start `bentoml serve` with the real default model from the user's own
store (``make test`` imports it first).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The user's model store, before this file points BENTOML_HOME elsewhere.
USER_BENTOML_HOME = os.environ.get("BENTOML_HOME") or str(Path.home() / "bentoml")
TINY_MODEL = "tiny-chat"

_scratch = Path(tempfile.mkdtemp(prefix="llm-bundle-tests-"))
atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
# Settings are read when service.py is imported, so they are set before any test imports it.
os.environ["BENTOML_HOME"] = str(_scratch / "bentoml")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
os.environ["LLM_MODEL"] = TINY_MODEL
os.environ["LLM_SYSTEM_PROMPT"] = "You are a test assistant."
os.environ["LLM_DEFAULT_MAX_TOKENS"] = "16"
os.environ["LLM_API_WORKERS"] = "2"
# BentoML's /metrics reads Prometheus' multiprocess directory, as under `bentoml serve`; it
# must be set before prometheus_client is first imported.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_scratch / "prometheus")
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in {"e2e", "deploy", "load", "vllm", "llamacpp", "containers"}:
            item.add_marker(folder)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer and template files only: no torch needed."""
    from tests.tiny_model import write_tokenizer

    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_model import write_model

    return write_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model_tag(tiny_model_dir: Path) -> str:
    """The tiny model, imported into the test model store the way users import theirs."""
    from runners.import_model import import_model

    return import_model(str(tiny_model_dir), TINY_MODEL)
