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


def test_beside_the_model_goes_a_tokenizer_entry_of_the_same_version_without_weights(
    tiny_model_dir: Path, tiny_model_tag: str
):
    from contract.settings import TOKENIZER_SUFFIX, CommonSettings
    from logic.model_files import ModelFiles

    name, version = tiny_model_tag.split(":")
    entry = bentoml.models.get(f"{name}{TOKENIZER_SUFFIX}:{version}")
    files = {p.name for p in Path(entry.path).iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= files
    assert not [f for f in files if f.endswith((".safetensors", ".bin"))]
    assert entry.info.labels["weights"] == tiny_model_tag
    # It is what the API declares, and all the API needs: tokenizer, template, limits.
    assert CommonSettings(model=tiny_model_tag).tokenizer_model == str(entry.tag)
    full, light = (
        ModelFiles.load(bentoml.models.get(tiny_model_tag).path),
        ModelFiles.load(entry.path),
    )
    assert light.stop_token_ids == full.stop_token_ids
    assert light.context_length == full.context_length
    assert light.tokenizer.encode("Hello there") == full.tokenizer.encode("Hello there")

    # A store from before the tokenizer entries: importing again adds the missing one.
    bentoml.models.delete(str(entry.tag))
    assert import_model(str(tiny_model_dir), TINY_MODEL) == tiny_model_tag
    assert bentoml.models.get(str(entry.tag)).info.labels["weights"] == tiny_model_tag
