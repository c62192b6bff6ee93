"""Real images of this tree, built and run with a Docker engine (`make test-containers`).

Without a reachable engine every test here is skipped, with the reason. The images are built
once per session from the user's default model (``make model``), on ``LLM_TEST_BASE_IMAGE``
(``make test-containers BASE_IMAGE=...``; `make base-image` builds one where Docker Hub
cannot be reached), with the CPU torch wheel that ``make torch-wheel TORCH=cpu`` put in
wheels/. The figures measured on the way (sizes, cold starts) go to
bench-results/containers.json and are printed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from contract.settings import DEFAULT_MODEL, TOKENIZER_SUFFIX, gguf_tag
from tests.conftest import USER_BENTOML_HOME
from tests.served import BENTOML, ROOT, free_port

DOCKER = shutil.which("docker")
COMPOSE = shutil.which("docker-compose")
BASE_IMAGE = os.environ.get("LLM_TEST_BASE_IMAGE", "python:3.11-slim")
TAG = "test"
# The API image looks for its runner here unless LLM_RUNNER_URL says otherwise: the runner
# container joins the tests' network under this name.
RUNNER_HOST = "llm-runner"
NETWORK = "llm-bundle-test"
FIGURES: dict[str, object] = {}


def _engine() -> str | None:
    """Why no Docker engine can be used, or None when one answers."""
    if DOCKER is None:
        return "no `docker` command (apt-get install docker.io, then start dockerd)"
    try:
        info = subprocess.run(
            [DOCKER, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer in 30 s"
    if info.returncode != 0:
        return f"no Docker engine reachable: {info.stderr.strip()[:300]}"
    return None


NO_ENGINE = _engine()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if NO_ENGINE:
        skip = pytest.mark.skip(reason=f"container tests need a Docker engine: {NO_ENGINE}")
        for item in items:
            if "containers" in str(item.fspath):
                item.add_marker(skip)


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


# ---------------------------------------------------------------- images


def _store_with_default_model(home: Path) -> str:
    """The tests' BentoML home, holding the user's default model, its tokenizer entry and its
    GGUF entry (linked, not copied); the model's exact tag."""
    user_models = Path(USER_BENTOML_HOME) / "models"
    for name in (DEFAULT_MODEL, f"{DEFAULT_MODEL}{TOKENIZER_SUFFIX}"):
        if not (user_models / name).is_dir():
            pytest.skip(f"{name} is not in {USER_BENTOML_HOME}: run `make model`")
        link = home / "models" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(user_models / name, target_is_directory=True)
    gguf = user_models / gguf_tag(DEFAULT_MODEL)  # the llama.cpp runner's, where make model made it
    if gguf.is_dir() and not (home / "models" / gguf.name).exists():
        (home / "models" / gguf.name).symlink_to(gguf, target_is_directory=True)
    version = (user_models / DEFAULT_MODEL / "latest").read_text().strip()
    return f"{DEFAULT_MODEL}:{version}"


@dataclass
class Images:
    """Builds this tree's Bentos and their images, each once, into the tests' store."""

    env: dict[str, str]
    built: dict[str, str] = field(default_factory=dict)

    def build(self, bentofile: str, image: str, **env: str) -> str:
        if image in self.built:
            return self.built[image]
        started = time.monotonic()
        built = self._bentoml(env, "build", "-f", bentofile, "--output", "tag")
        bento = re.search(r"__tag__:(\S+)", built).group(1)
        self._bentoml(env, "containerize", bento, "-t", image)
        size = int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
        FIGURES[f"{image} size (MB)"] = round(size / 1e6)
        FIGURES[f"{image} build (s)"] = round(time.monotonic() - started)
        self.built[image] = bento
        return bento

    def _bentoml(self, env: dict[str, str], *args: str) -> str:
        result = subprocess.run(
            [BENTOML, *args],
            cwd=ROOT,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    def api(self) -> str:
        image = f"llm-bundle-api:{TAG}"
        self.build("bentofile.api.yaml", image, LLM_RUNNER_URL=f"http://{RUNNER_HOST}:3000")
        return image

    def runner(self) -> str:
        image = f"llm-bundle-runner:{TAG}"
        self.build("bentofile.runner.yaml", image, LLM_TORCH_WHEEL=self.torch_wheel)
        return image

    def runner_llamacpp(self) -> str:
        image = f"llm-bundle-runner-llamacpp:{TAG}"
        listed = ROOT / "wheels" / ".llamacpp"
        if not listed.is_file():
            pytest.fail("no llama-cpp-python wheel in wheels/: run `make test-containers`")
        self.build(
            "bentofile.llamacpp.yaml", image, LLM_ENGINE="llamacpp",
            LLM_LLAMACPP_WHEEL=listed.read_text().strip(),
            UV_OVERRIDE="wheels/llamacpp-overrides.txt",  # the lock without torch, as the image
        )  # fmt: skip
        return image

    def all_in_one(self) -> str:
        image = f"llm-bundle:{TAG}"
        self.build("bentofile.yaml", image, LLM_TORCH_WHEEL=self.torch_wheel)
        return image

    @property
    def torch_wheel(self) -> str:
        listed = ROOT / "wheels" / ".torch"
        if not listed.is_file():
            pytest.fail("no CPU torch wheel in wheels/: run `make torch-wheel TORCH=cpu` first")
        return listed.read_text().strip()


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    home = Path(os.environ["BENTOML_HOME"])
    model = _store_with_default_model(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update(
        BENTOML_HOME=str(home),
        BENTOML_DO_NOT_TRACK="true",
        DOCKER_BUILDKIT="0",  # no buildx here; BentoML turns BuildKit on unless told
        LLM_MODEL=model,
        LLM_BASE_IMAGE=BASE_IMAGE,
    )
    yield Images(env)
    out = ROOT / "bench-results" / "containers.json"
    out.parent.mkdir(exist_ok=True)
    FIGURES["base image"] = BASE_IMAGE
    out.write_text(json.dumps(FIGURES, indent=2) + "\n")
    print(f"\ncontainer figures ({out.relative_to(ROOT)}):")
    for key, value in FIGURES.items():
        print(f"  {key}: {value}")


# ---------------------------------------------------------------- containers


@dataclass
class Container:
    name: str
    url: str  # the published port on loopback

    def ready(self, path: str = "/readyz", timeout: float = 300) -> float:
        """Seconds until ``path`` answers 200 (fails with the container's log if it never
        does, or if the container exits)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if httpx.get(f"{self.url}{path}", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            state = docker("inspect", "-f", "{{.State.Status}}", self.name, check=False).stdout
            assert state.strip() in {"running", "created", "restarting"}, self.log()
            time.sleep(0.1)
        raise AssertionError(f"{self.name}{path} not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        result = docker("logs", "--tail", "60", self.name, check=False)
        return result.stdout[-4000:] + result.stderr[-4000:]


@pytest.fixture(scope="session")
def network() -> Iterator[str]:
    docker("network", "rm", NETWORK, check=False)
    docker("network", "create", NETWORK)
    yield NETWORK
    docker("network", "rm", NETWORK, check=False)


@pytest.fixture(scope="session")
def run_container(network: str) -> Iterator:
    """``run_container(name, image, *args, alias=None, env={})``: started detached on the
    tests' network with port 3000 published on loopback; removed at the end."""
    names: list[str] = []

    def run(name: str, image: str, *args: str, alias: str | None = None, env=None) -> Container:
        docker("rm", "-f", name, check=False)
        port = free_port()
        options = ["--name", name, "--network", network, "-p", f"127.0.0.1:{port}:3000"]
        if alias:
            options += ["--network-alias", alias]
        for key, value in {"BENTOML_DO_NOT_TRACK": "true", **(env or {})}.items():
            options += ["-e", f"{key}={value}"]
        docker("run", "-d", *options, image, *args)
        names.append(name)
        return Container(name, f"http://127.0.0.1:{port}")

    yield run
    for name in names:
        docker("rm", "-f", name, check=False)
