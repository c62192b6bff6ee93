"""Model import into the BentoML store: converted files, metadata, no duplicate work."""

from __future__ import annotations

from pathlib import Path

import bentoml

from runners.import_model import import_model
from tests.conftest import TINY_MODEL


def test_import_writes_serving_files_and_metadata(tiny_model_tag: str):
    model = bentoml.models.get(tiny_model_tag)
    files = {p.name for p in Path(model.path).iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    assert (
        "chat_template.jinja" in files
        or "chat_template" in (Path(model.path) / "tokenizer_config.json").read_text()
    )
    meta = model.info.metadata
    assert meta["source_format"] == "huggingface"
    assert meta["dtype"] == "float32"
    assert meta["context_length"] == 256
    assert meta["parameters"] > 0
    assert Path(meta["source"]).is_dir()


def test_importing_the_same_source_twice_finds_it_in_the_store(
    tiny_model_dir: Path, tiny_model_tag: str
):
    before = [str(m.tag) for m in bentoml.models.list(TINY_MODEL)]
    again = import_model(str(tiny_model_dir), TINY_MODEL)
    after = [str(m.tag) for m in bentoml.models.list(TINY_MODEL)]
    assert again == tiny_model_tag
    assert before == after
