"""The runner's Bento on llama.cpp (`make build-runner ENGINE=llamacpp`): the runner Bento's
tree and service, the engine recorded for the image, no GPU asked for, and the wheel built
here in its lock (PyPI has the source only). Built for real with `bentoml build`; its image
is built and run by tests/containers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_MODEL
from tests.deploy.conftest import build_bento
from tests.served import ROOT


def test_the_llamacpp_bentofile_differs_from_the_runners_only_by_the_engine():
    runner = yaml.safe_load((ROOT / "bentofile.runner.yaml").read_text())
    llamacpp = yaml.safe_load((ROOT / "bentofile.llamacpp.yaml").read_text())
    assert llamacpp["envs"].pop() == {"name": "LLM_ENGINE", "value": "llamacpp"}
    assert llamacpp.pop("args") == {"engine": "llamacpp"}  # its image installs the wheel
    assert llamacpp.pop("name") == "llm-bundle-runner-llamacpp"
    assert llamacpp["labels"].pop("engine") == "llamacpp"
    # Its wheels: the llama.cpp one and the overrides that leave torch out, for the runner's
    # any torch wheel and the CPU overrides.
    wheels = {i for i in llamacpp["include"] if i.startswith("/wheels/")}
    assert wheels == {"/wheels/llama_cpp_python-*.whl", "/wheels/llamacpp-overrides.txt"}
    for config in (runner, llamacpp):
        config.pop("description")
        config["include"] = [i for i in config["include"] if not i.startswith("/wheels/")]
    runner.pop("name")
    assert llamacpp == runner  # service, the tree, envs, image: all the same


@pytest.fixture(scope="module")
def built_wheel():
    """The wheel `make test-llamacpp` installed, under wheels/ for the build (then removed)."""
    found = subprocess.run(
        ["bash", str(ROOT / "deploy" / "llamacpp-wheel.sh")], capture_output=True, text=True,
        env={**os.environ, "PY": sys.executable}, timeout=1800,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr[-2000:]
    wheels = ROOT / "wheels"
    if wheels.exists():
        pytest.skip("wheels/ exists (a build in progress?): not touching it")
    wheels.mkdir()
    try:
        shutil.copy(found.stdout.strip(), wheels)
        yield f"wheels/{os.path.basename(found.stdout.strip())}"
    finally:
        shutil.rmtree(wheels)


@pytest.fixture(scope="module")
def tiny_gguf_tag(tiny_model_tag, tmp_path_factory):
    """The tiny model's GGUF entry, as `make model` adds one for a model that has a GGUF (a
    placeholder file here: the Bento is built, not served)."""
    import bentoml

    from runners.import_model import import_gguf_entry

    gguf = tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    return import_gguf_entry(bentoml.models.get(tiny_model_tag), gguf=gguf)


def test_the_llamacpp_runner_bento_records_the_engine_no_gpu_and_the_wheel(
    built_wheel, tiny_model_tag, tiny_gguf_tag
):
    env = {"LLM_MODEL": TINY_MODEL, "LLM_ENGINE": "llamacpp", "LLM_LLAMACPP_WHEEL": built_wheel,
           "LLM_TORCH_WHEEL": "", "LLM_RUNNER_URL": "",
           "UV_OVERRIDE": "wheels/llamacpp-overrides.txt"}  # fmt: skip
    shutil.copy(ROOT / "deploy" / "llamacpp-overrides.txt", ROOT / "wheels")
    built = build_bento(env, "-f", "bentofile.llamacpp.yaml")
    manifest = built.manifest
    assert manifest["name"] == "llm-bundle-runner-llamacpp"
    assert manifest["labels"]["engine"] == "llamacpp"
    assert {e["name"]: e["value"] for e in manifest["envs"]}["LLM_ENGINE"] == "llamacpp"
    (service,) = manifest["services"]
    assert service["name"] == "LLMRunner" and "gpu" not in service["config"]["resources"]
    # The GGUF entry: the GGUF and tokenizer files, not the weights in safetensors.
    assert tiny_gguf_tag.startswith(tiny_model_tag.split(":")[0] + "-gguf:")
    assert [m["tag"] for m in service["models"]] == [tiny_gguf_tag]
    import bentoml  # the tests' store, which the Bento's image takes its models from

    entry = Path(bentoml.models.get(tiny_gguf_tag).path)
    packed = {p.name for p in entry.iterdir() if p.is_file()}
    assert "tiny.Q4_1.gguf" in packed and "tokenizer.json" in packed
    assert not [name for name in packed if name.endswith(".safetensors")]
    lock = (built.path / "env" / "python" / "requirements.txt").read_text()
    assert f"./{built_wheel}" in lock.splitlines()
    assert not re.search(r"^(torch|triton)==", lock, re.M)  # that runner never imports torch
    assert not re.search(r"^(llama-cpp-python|vllm)==", lock, re.M | re.I)  # no sdist to build
    assert (built.path / "src" / built_wheel).is_file()
    dockerfile = (built.path / "env" / "docker" / "Dockerfile").read_text()
    assert "libgomp1" in dockerfile and "build-essential" not in dockerfile
