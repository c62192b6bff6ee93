"""What this project reads from BentoML or a built Bento that BentoML does not hand over.

Each function here names the private part it reads, so a BentoML upgrade has one file to
check (the Makefile pins bentoml 1.4.39).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml

from contract.settings import TOKENIZER_SUFFIX, CommonSettings

RUNNER_SERVICE = "LLMRunner"  # the runner's service name, as the API's dependency


def runner_mapping_url(service_name: str = RUNNER_SERVICE) -> str | None:
    """The URL ``bentoml serve`` (or ``--depends NAME=URL``) handed this worker for a
    dependency, read where ``bentoml.depends`` reads it, without resolving the dependency
    (``BentoMLContainer.remote_runner_mapping``, private in bentoml 1.4)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.remote_runner_mapping.get().get(service_name)


S = TypeVar("S", bound=CommonSettings)


def pin_bento_model(settings: S, here: Path = Path(__file__)) -> S:
    """The settings to serve with: ``settings`` itself, unless this code runs from a built
    Bento (``<bento>/src/glue/``) and ``LLM_MODEL`` was not set; then a copy whose model is
    the exact version the Bento recorded at build time (the settings given are not changed).

    A Bento lists its models by exact tag, but ``BentoModel("name")`` would take the newest
    ``name`` in the store; and a runner served alone (``--service-name LLMRunner``) does not
    get the env the Bento recorded. In an API-only Bento (bentofile.api.yaml), the version of
    the tokenizer entry the API recorded.
    """
    src = here.resolve().parents[1]
    manifest_path = src.parent / "bento.yaml"
    if "model" in settings.model_fields_set or src.name != "src" or not manifest_path.is_file():
        return settings
    manifest = yaml.safe_load(manifest_path.read_text())
    models = {
        s.get("name"): [m["tag"] for m in s.get("models") or []]
        for s in manifest.get("services") or []
    }
    if models.get(RUNNER_SERVICE):
        return settings.model_copy(update={"model": models[RUNNER_SERVICE][0]})
    for tag in models.get("ChatAPI", []):
        name, _, version = tag.partition(":")
        if name.endswith(TOKENIZER_SUFFIX):
            model = f"{name.removesuffix(TOKENIZER_SUFFIX)}:{version}"
            return settings.model_copy(update={"model": model})
    return settings
