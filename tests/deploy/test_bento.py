"""The Bento: what `bentoml build` records, what its lock installs, and what the image that
`bentoml containerize` would build holds. No Docker engine runs here, so the image itself is
not built; its Dockerfile and build context are generated exactly as `containerize` does."""

from __future__ import annotations

import re
from importlib.metadata import requires, version
from pathlib import Path

import bentoml
import pytest
import yaml
from packaging.requirements import Requirement

from contract.settings import TOKENIZER_SUFFIX
from tests.conftest import TINY_MODEL
from tests.deploy.conftest import BuiltBento
from tests.served import ROOT

BENTOFILES = [
    "bentofile.yaml",
    "bentofile.api.yaml",
    "bentofile.runner.yaml",
    "bentofile.vllm.yaml",
    "bentofile.llamacpp.yaml",
]
# What only the runner imports: the API's Bento leaves them out (its image has no torch).
RUNNER_ONLY = {"torch", "transformers", "safetensors", "xgrammar", "numpy"}
# Needed only to import GGUF files into the model store, never in an image.
IMPORT_ONLY = {"gguf", "accelerate"}


def _names(specs: list[str]) -> set[str]:
    return {Requirement(spec).name for spec in specs}


@pytest.mark.parametrize("bentofile", BENTOFILES)
def test_no_bentofile_lists_packages_they_are_pyprojects_package_sets(bentofile):
    config = yaml.safe_load((ROOT / bentofile).read_text())
    assert "packages" not in (config.get("python") or {})


def test_each_image_installs_pyprojects_package_sets_and_the_api_none_of_the_runners():
    from glue.image import bento_image, package_set
    from glue.settings import BuildSettings

    declared = {r.name for r in map(Requirement, requires("llm-bundle") or [])}  # extras too
    api, runner = package_set(["api"]), package_set(["runner"])
    both = package_set(["api", "runner"])
    assert not _names(api) & RUNNER_ONLY and _names(runner) >= RUNNER_ONLY
    assert _names(both) == _names(api) | _names(runner)
    assert not _names(both) & (IMPORT_ONLY | {"bentoml"})  # `bentoml build` adds its own
    assert _names(both) <= declared
    image = bento_image(BuildSettings(), extras=["api"], with_runner=False)
    assert image.python_requirements.splitlines() == api
    assert Requirement(package_set(["vllm"])[-1]).name == "vllm"


@pytest.mark.parametrize("bentofile", BENTOFILES)
def test_no_bentofile_has_a_docker_section_that_would_bring_back_the_compilers(bentofile):
    """glue/image.py sets the image; a `docker:` section's distro would re-add BentoML's
    apt-get layer of build-essential and git (630 MB)."""
    config = yaml.safe_load((ROOT / bentofile).read_text())
    assert "docker" not in config
    assert {"name": "UV_NO_CACHE", "value": "1"} in config["envs"]


def test_the_bento_records_services_resources_model_labels_and_envs(
    bento: BuiltBento, tiny_model_tag: str
):
    manifest = bento.manifest
    assert manifest["entry_service"] == "ChatAPI"
    services = {s["name"]: s for s in manifest["services"]}
    assert set(services) == {"ChatAPI", "LLMRunner"}

    api, runner = services["ChatAPI"], services["LLMRunner"]
    assert api["dependencies"] == [{"service": "LLMRunner"}]
    assert api["config"]["resources"] == {"cpu": "2", "memory": "2Gi"}  # defaults
    assert api["config"]["workers"] == 3  # LLM_API_WORKERS at build time
    assert runner["config"]["resources"] == {"gpu": 1, "gpu_type": "nvidia-l4", "memory": "24Gi"}
    assert runner["config"]["workers"] == 1
    assert runner["config"]["traffic"]["concurrency"] == 64
    # The exact model version, not "latest"; the API's is the tokenizer entry (no weights).
    name, version = tiny_model_tag.split(":")
    assert [m["tag"] for m in runner["models"]] == [tiny_model_tag]
    assert [m["tag"] for m in api["models"]] == [f"{name}{TOKENIZER_SUFFIX}:{version}"]

    labels = manifest["labels"]
    assert labels["model"] == TINY_MODEL and labels["stage"] == "test" and labels["owner"]
    assert {e["name"]: e["value"] for e in manifest["envs"]}["LLM_MODEL"] == TINY_MODEL
    description = (bento.path / "README.md").read_text()  # the bentofile's description
    assert "LLMRunner" in description and "ChatAPI" in description

    packed = {p.relative_to(bento.path / "src").as_posix() for p in (bento.path / "src").rglob("*")}
    assert {"service.py", "logic/chat.py", "runners/llm.py", "runners/engine.py"} <= packed
    assert not any(p.startswith(("tests", "bench", "deploy", ".venv")) for p in packed)


def test_the_lock_holds_a_cuda_build_of_torch_and_every_runtime_dependency(bento: BuiltBento):
    lock = (bento.path / "env" / "python" / "requirements.txt").read_text()
    pinned = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock, re.M))
    pinned = {name.lower().replace("_", "-"): v for name, v in pinned.items()}
    from glue.image import package_set

    for requirement in map(Requirement, package_set(["api", "runner"])):
        if requirement.marker and not requirement.marker.evaluate({"python_version": "3.11"}):
            continue  # not for the image's Python (tomli, before 3.11)
        name = requirement.name
        assert name in pinned, f"{name} is not in the Bento's lock"
        assert requirement.specifier.contains(pinned[name]), (name, pinned[name])
    assert pinned["bentoml"] == version("bentoml")
    # PyPI's linux torch is the CUDA build: its CUDA runtime and cuDNN come as wheels.
    assert any(n.startswith("nvidia-cuda-runtime") for n in pinned), "torch is not a CUDA build"
    assert any(n.startswith("nvidia-cudnn") for n in pinned)


def test_the_image_packs_the_model_and_its_entrypoint_serves_either_service(
    bento: BuiltBento, tiny_model_tag: str
):
    from bentoml._internal.container import construct_containerfile

    stored = bentoml.bentos.get(bento.tag)
    # The build context and Dockerfile `bentoml containerize` hands to Docker.
    with construct_containerfile(stored, enable_buildkit=True) as (context, dockerfile_path):
        context = Path(context)
        dockerfile = Path(dockerfile_path).read_text()
        entrypoint = (context / "env" / "docker" / "entrypoint.sh").read_text()
        name, model_version = tiny_model_tag.split(":")
        packed_model = context / "models" / name / model_version
        packed_files = {p.name for p in packed_model.rglob("*")}
        lock_in_context = (context / "env" / "python" / "requirements.txt").is_file()

    assert {"model.yaml", "config.json", "tokenizer.json"} <= packed_files
    assert any(f.endswith(".safetensors") for f in packed_files)
    assert lock_in_context
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert "apt-get" not in dockerfile and "build-essential" not in dockerfile  # wheels only
    # The model the Bento was built with is the one the image serves.
    assert re.search(rf"^ARG LLM_MODEL={TINY_MODEL}$", dockerfile, re.M)
    assert re.search(r"^ENV LLM_MODEL=\$LLM_MODEL$", dockerfile, re.M)
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile
    assert re.search(r"^COPY --chown=bentoml:bentoml \. \./$", dockerfile, re.M)  # src, models
    assert re.search(r"^EXPOSE 3000$", dockerfile, re.M)
    assert 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]' in dockerfile
    # No arguments: `bentoml serve` of the Bento (API and runner). `start-http-server ...`:
    # one service, which is how the README runs the runner and the API on separate hosts.
    assert 'set -- bentoml serve "$@" "$BENTO_PATH"' in entrypoint
    assert 'bentoml_cli._internal.start "${@:1}" "$BENTO_PATH"' in entrypoint


def test_a_bento_serves_the_model_version_it_recorded_unless_llm_model_says_otherwise(
    tmp_path, monkeypatch
):
    from glue.bento import pin_bento_model
    from logic.settings import APISettings as Settings

    module = tmp_path / "bento" / "src" / "glue" / "bento.py"
    module.parent.mkdir(parents=True)
    services = [
        {"name": "ChatAPI", "models": [{"tag": "other:1"}]},
        {"name": "LLMRunner", "models": [{"tag": "chat-model:abc123"}]},
    ]
    (tmp_path / "bento" / "bento.yaml").write_text(yaml.safe_dump({"services": services}))

    monkeypatch.delenv("LLM_MODEL")
    from_bento = pin_bento_model(Settings(), here=module)
    assert from_bento.model == "chat-model:abc123" and from_bento.model_name == "chat-model"

    # as LLM_MODEL would set it
    chosen = pin_bento_model(Settings(model="chat-model:def456"), here=module)
    assert chosen.model == "chat-model:def456"

    # An API-only Bento records the tokenizer entry: the API serves that version's model id.
    api_only = [{"name": "ChatAPI", "models": [{"tag": f"chat-model{TOKENIZER_SUFFIX}:abc123"}]}]
    (tmp_path / "bento" / "bento.yaml").write_text(yaml.safe_dump({"services": api_only}))
    api = pin_bento_model(Settings(), here=module)
    assert api.model == "chat-model:abc123"
    assert api.tokenizer_model == f"chat-model{TOKENIZER_SUFFIX}:abc123"

    # a source tree: no <bento>/bento.yaml above it
    from_source = pin_bento_model(Settings(), here=ROOT / "glue" / "bento.py")
    assert from_source.model == from_source.model_fields["model"].default
