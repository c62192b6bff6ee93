"""Two Bentos from one tree: the runner's (bentofile.runner.yaml: torch, the weights, the GPU)
and the API's (bentofile.api.yaml: no torch, no weights), what each records and packs, and
the two served from the store as their containers would serve them (tests/containers runs
the images themselves where a Docker engine is reachable)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import bentoml
import httpx
import openai
import pytest
from packaging.requirements import Requirement

from contract.settings import TOKENIZER_SUFFIX
from glue.image import CPU_OVERRIDES, LLAMACPP_OVERRIDES, PREBUILT_DISTRO, bento_image, image_envs
from glue.settings import BuildSettings
from tests.deploy.conftest import BUILD_ENV, BuiltBento, build_bento
from tests.served import ROOT, START_HTTP_SERVER, ServedProcess, free_port

RUNNER_URL = "http://llm-runner:3000"
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BASE = "registry.example.com/base/python:3.11"
# The runner's packages: none of them, nor CUDA, may reach the API's lock.
# (nvidia-ml-py, which BentoML itself needs, is a small NVML binding, not CUDA.)
RUNNER_PACKAGES = (
    "torch",
    "transformers",
    "safetensors",
    "xgrammar",
    "triton",
    "vllm",
    "nvidia-cu",
    "nvidia-nccl",
)


@pytest.fixture(scope="module")
def api_bento(tiny_model_tag: str) -> BuiltBento:
    env = {**BUILD_ENV, "LLM_RUNNER_URL": RUNNER_URL, "LLM_BASE_IMAGE": BASE}
    return build_bento(env, "-f", "bentofile.api.yaml", "--label", "stage=test")


@pytest.fixture(scope="module")
def runner_bento(tiny_model_tag: str) -> BuiltBento:
    return build_bento(BUILD_ENV, "-f", "bentofile.runner.yaml")


def _lock(bento: BuiltBento) -> dict[str, str]:
    lock = (bento.path / "env" / "python" / "requirements.txt").read_text()
    return {
        n.lower().replace("_", "-"): v for n, v in re.findall(r"^([\w.\-]+)==(\S+)", lock, re.M)
    }


def _dockerfile(bento: BuiltBento) -> tuple[str, set[str]]:
    """The Dockerfile `bentoml containerize` would build, and the model files it packs."""
    from bentoml._internal.container import construct_containerfile

    with construct_containerfile(bentoml.bentos.get(bento.tag)) as (context, dockerfile):
        models = Path(context) / "models"
        packed = {p.relative_to(models).as_posix() for p in models.rglob("*") if p.is_file()}
        return Path(dockerfile).read_text(), packed


def test_the_api_bento_holds_the_api_alone_with_its_runner_as_a_url(api_bento, tiny_model_tag):
    manifest = api_bento.manifest
    assert manifest["entry_service"] == "ChatAPI"
    (api,) = manifest["services"]  # no LLMRunner in its graph, no dependency BentoML resolves
    assert api["dependencies"] == []
    name, version = tiny_model_tag.split(":")
    assert [m["tag"] for m in api["models"]] == [f"{name}{TOKENIZER_SUFFIX}:{version}"]
    envs = {e["name"]: e["value"] for e in manifest["envs"]}
    assert envs["LLM_RUNNER_URL"] == RUNNER_URL  # the image's default; docker run -e overrides
    assert manifest["labels"]["component"] == "api"


def test_the_api_bentos_lock_and_image_have_no_torch_and_no_weights(api_bento, tiny_model_tag):
    lock = _lock(api_bento)
    assert {"bentoml", "tokenizers", "jinja2", "jsonschema", "pydantic-settings"} <= lock.keys()
    assert not [n for n in lock if n.startswith(RUNNER_PACKAGES)]
    dockerfile, packed = _dockerfile(api_bento)
    assert re.search(rf"^FROM {re.escape(BASE)} ", dockerfile, re.M)  # LLM_BASE_IMAGE
    assert "apt-get" not in dockerfile
    name, version = tiny_model_tag.split(":")
    assert {p.split("/")[0] for p in packed} == {f"{name}{TOKENIZER_SUFFIX}"}  # that entry only
    assert {"tokenizer.json", "chat_template.jinja", "config.json"} <= {
        Path(p).name for p in packed
    }
    assert not [p for p in packed if p.endswith((".safetensors", ".bin", ".gguf"))]


def test_the_runner_bento_holds_the_runner_its_weights_and_cuda_torch(runner_bento, tiny_model_tag):
    manifest = runner_bento.manifest
    assert manifest["entry_service"] == "LLMRunner"
    (runner,) = manifest["services"]
    assert [m["tag"] for m in runner["models"]] == [tiny_model_tag]
    assert runner["config"]["resources"] == {"gpu": 1, "gpu_type": "nvidia-l4", "memory": "24Gi"}
    lock = _lock(runner_bento)
    assert {"torch", "transformers", "xgrammar"} <= lock.keys()
    assert any(n.startswith("nvidia-cuda-runtime") for n in lock)  # PyPI's torch: CUDA
    dockerfile, packed = _dockerfile(runner_bento)
    assert re.search(r"^FROM python:3\.11-slim ", dockerfile, re.M)  # the default base
    assert "apt-get" not in dockerfile
    assert any(p.endswith(".safetensors") for p in packed)


def _packed_sources(bento: BuiltBento) -> dict[str, set[str]]:
    """Each packed Python file, and the top-level packages it imports (in functions too)."""
    from tests.unit.test_architecture import imported_roots

    src = bento.path / "src"
    return {p.relative_to(src).as_posix(): imported_roots(p) for p in src.rglob("*.py")}


def test_no_file_the_api_bento_packs_imports_torch_or_an_engine(api_bento):
    packed = _packed_sources(api_bento)
    assert "service.py" in packed and "api/runner_client.py" in packed
    # No runners/ at all: service.py imports it only where no LLM_RUNNER_URL is set, and the
    # served API Bento (below) starts without it.
    assert not [p for p in packed if p.startswith("runners/")]
    heavy = {"torch", "transformers", "vllm", "xgrammar", "safetensors"}
    assert not {p: roots & heavy for p, roots in packed.items() if roots & heavy}


def test_the_runner_bento_packs_no_business_logic(runner_bento):
    packed = _packed_sources(runner_bento)
    assert "runners/llm.py" in packed and "contract/tokens.py" in packed
    assert not [p for p in packed if p.startswith(("logic/", "api/")) or p == "service.py"]


def test_a_torch_wheel_goes_only_into_images_that_run_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the build context
    wheel = Path("wheels/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl")
    wheel.parent.mkdir()
    wheel.write_bytes(b"")
    settings = BuildSettings(torch_wheel=str(wheel))
    runner = bento_image(settings, extras=["runner"], with_runner=True)
    assert f"./{wheel}" in runner.python_requirements
    api = bento_image(settings, extras=["api"], with_runner=False)
    assert "torch" not in api.python_requirements
    # A distro BentoML does not know: its image builder adds no apt-get layer of compilers.
    assert runner.distro == PREBUILT_DISTRO and runner.commands == []
    assert runner.base_image == "python:3.11-slim"
    # A wheel outside the build context would be locked from a path the image does not have.
    for elsewhere in (f"/opt/{wheel}", "wheels/missing.whl", "torch.tar.gz"):
        with pytest.raises(ValueError, match="LLM_TORCH_WHEEL"):
            bento_image(BuildSettings(torch_wheel=elsewhere), extras=[], with_runner=True)


def test_a_llamacpp_image_installs_its_wheel_and_the_openmp_runtime(tmp_path, monkeypatch):
    """An image whose runner runs on llama.cpp installs the wheel built here (PyPI has the
    source only; the image has no compilers) and Debian's libgomp1, which the wheel links;
    built from the tree without a wheel, it says how to get one; no other image changes."""
    monkeypatch.chdir(tmp_path)  # the build context
    wheel = Path("wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl")
    wheel.parent.mkdir()
    wheel.write_bytes(b"")
    runner = bento_image(
        BuildSettings(llamacpp_wheel=str(wheel)), extras=["runner"], with_runner=True,
        llamacpp=True,
    )  # fmt: skip
    assert f"./{wheel}" in runner.python_requirements
    (command,) = runner.commands + runner.post_commands
    assert "apt-get install" in command and "libgomp1" in command
    assert "build-essential" not in command and runner.distro == PREBUILT_DISTRO
    with pytest.raises(ValueError, match="LLM_LLAMACPP_WHEEL.*make build-runner ENGINE=llamacpp"):
        bento_image(BuildSettings(), extras=["runner"], with_runner=True, llamacpp=True)
    with pytest.raises(ValueError, match="LLM_LLAMACPP_WHEEL"):  # outside the build context
        bento_image(BuildSettings(llamacpp_wheel=f"/opt/{wheel}"), extras=[], with_runner=True,
                    llamacpp=True)  # fmt: skip
    api = bento_image(
        BuildSettings(llamacpp_wheel=str(wheel)), extras=["api"], with_runner=False, llamacpp=True
    )
    assert "llama" not in api.python_requirements and api.commands + api.post_commands == []


def test_an_image_with_the_cpu_torch_installs_no_triton(tmp_path):
    """A runner's image with the CPU build of torch reads the overrides that leave triton out
    (xgrammar's CUDA-only dependency, 999 MB) while it installs; no other image does."""
    (tmp_path / "pyproject.toml").write_text("")
    cpu = BuildSettings(torch_wheel="wheels/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl")
    with pytest.raises(ValueError, match="make torch-wheel TORCH=cpu"):
        image_envs(cpu, with_runner=True, pyproject=tmp_path / "pyproject.toml")
    overrides = tmp_path / CPU_OVERRIDES
    overrides.parent.mkdir()
    overrides.write_text((ROOT / "deploy" / "cpu-overrides.txt").read_text())
    envs = image_envs(cpu, with_runner=True, pyproject=tmp_path / "pyproject.toml")
    assert envs == [{"name": "UV_OVERRIDE", "value": CPU_OVERRIDES}]
    (line,) = [x for x in overrides.read_text().splitlines() if x and not x.startswith("#")]
    requirement = Requirement(line)
    assert requirement.name == "triton" and not requirement.marker.evaluate()
    cuda = BuildSettings(torch_wheel="wheels/torch-2.13.0-cp311-cp311-linux_x86_64.whl")
    for settings, with_runner in ((cuda, True), (BuildSettings(), True), (cpu, False)):
        found = image_envs(settings, with_runner=with_runner, pyproject=tmp_path / "pyproject.toml")
        assert found == []


def test_a_llamacpp_image_installs_no_torch(tmp_path, monkeypatch):
    """The runner on llama.cpp never imports torch, so its image leaves torch and triton out
    (overrides read by the lock and the image's install), whatever torch wheel is named."""
    (tmp_path / "pyproject.toml").write_text("")
    settings = BuildSettings(torch_wheel="wheels/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl")
    with pytest.raises(ValueError, match="make build-runner ENGINE=llamacpp"):
        image_envs(settings, with_runner=True, llamacpp=True, pyproject=tmp_path / "pyproject.toml")
    overrides = tmp_path / LLAMACPP_OVERRIDES
    overrides.parent.mkdir()
    overrides.write_text((ROOT / "deploy" / "llamacpp-overrides.txt").read_text())
    envs = image_envs(
        settings, with_runner=True, llamacpp=True, pyproject=tmp_path / "pyproject.toml"
    )
    assert envs == [{"name": "UV_OVERRIDE", "value": LLAMACPP_OVERRIDES}]
    lines = [x for x in overrides.read_text().splitlines() if x and not x.startswith("#")]
    left_out = {Requirement(x).name for x in lines if not Requirement(x).marker.evaluate()}
    assert left_out == {"torch", "triton"}
    monkeypatch.chdir(tmp_path)  # the build context
    wheel = Path("wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl")
    wheel.write_bytes(b"")
    Path(settings.torch_wheel).write_bytes(b"")
    image = bento_image(
        settings.model_copy(update={"llamacpp_wheel": str(wheel)}), extras=["runner"],
        with_runner=True, llamacpp=True,
    )  # fmt: skip
    assert not [r for r in image.python_requirements.splitlines() if "torch-" in r]


# ---------------------------------------------------------------- the two, served


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    return {**env, "LLM_API_WORKERS": "1", "BENTOML_DO_NOT_TRACK": "true", **extra}


@pytest.fixture
def served_pair(api_bento, runner_bento) -> Iterator[tuple[ServedProcess, ServedProcess]]:
    """Each Bento's entry service, started the way its container starts it; the API pointed
    at the runner by LLM_RUNNER_URL over the URL its Bento recorded."""
    runner = ServedProcess(
        [*START_HTTP_SERVER, runner_bento.tag], port=free_port(), env=_env(LLM_DEVICE="cpu")
    )
    with runner:
        api = ServedProcess(
            [*START_HTTP_SERVER, api_bento.tag],
            port=free_port(),
            env=_env(LLM_RUNNER_URL=runner.url),
        )
        with api:
            yield api, runner


def test_the_api_bento_serves_through_the_runner_bento_without_loading_torch(served_pair):
    api, runner = served_pair
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.usage.completion_tokens > 0
    api_tree = [api.process, *api.process.children(recursive=True)]
    mapped = {m.path for p in api_tree for m in p.memory_maps()}
    assert not [path for path in mapped if "torch" in path]
    runner_tree = [runner.process, *runner.process.children(recursive=True)]
    assert [p for p in runner_tree for m in p.memory_maps() if "libtorch" in m.path]


def test_the_api_bento_starts_before_its_runner_answers_503_then_serves_once_it_is_up(
    api_bento, runner_bento
):
    """Kubernetes and compose may start the API first, or restart the runner under it: the API
    must start and answer 503 with Retry-After meanwhile, not fail to start."""
    runner_port = free_port()
    api = ServedProcess(
        [*START_HTTP_SERVER, api_bento.tag],
        port=free_port(),
        env=_env(
            LLM_RUNNER_URL=f"http://127.0.0.1:{runner_port}", LLM_READY_REQUIRES_RUNNER="false"
        ),
    )
    with api:
        away = httpx.post(f"{api.url}/v1/chat/completions", json=CHAT, timeout=30)
        assert away.status_code == 503 and int(away.headers["retry-after"]) >= 1
        assert away.json()["error"]["code"] == "runner_unavailable"
        runner = ServedProcess(
            [*START_HTTP_SERVER, runner_bento.tag], port=runner_port, env=_env(LLM_DEVICE="cpu")
        )
        with runner:
            assert (
                httpx.post(f"{api.url}/v1/chat/completions", json=CHAT, timeout=60).status_code
                == 200
            )
