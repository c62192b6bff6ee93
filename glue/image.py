"""The container image this tree's Bentos build on, read when ``bentoml build`` imports the
services: the base, no compilers, and the Python packages, from pyproject.toml's package sets
(its runtime dependencies and extras), so they are written once.

- The base image is ``LLM_BASE_IMAGE`` (default ``python:3.11-slim``; ``make base-image``
  builds one from Debian's packages where Docker Hub cannot be reached).
- No compilers. BentoML's image builder apt-installs ``build-essential`` and ``git`` (630 MB)
  as the first step on any base of a distro it knows. Every package we install is a wheel, so
  the image declares a distro BentoML does not know ("prebuilt"), and that step is left out.
  tests/deploy checks the generated Dockerfile for it.
- ``LLM_TORCH_WHEEL``: a torch wheel under ``wheels/`` that images with the runner install
  instead of PyPI's torch (which is the CUDA build), e.g. the CPU build for CPU-only hosts.
  An API-only Bento (``LLM_RUNNER_URL`` set) has no torch at all.
- No triton beside a CPU torch: xgrammar requires it on Linux x86_64 (999 MB), but only its
  CUDA kernel imports it. :func:`image_envs` gives such images ``UV_OVERRIDE``, the overrides
  file deploy/cpu-overrides.txt (copied into wheels/ with the CPU wheel), which the image's
  ``uv pip install`` reads: BentoML's Dockerfile resolves the lock's dependencies again there,
  so leaving triton out of the lock alone would not keep it out of the image.
- ``LLM_LLAMACPP_WHEEL``: the llama-cpp-python wheel an image whose runner runs on llama.cpp
  installs (it is built once per CPU kind by deploy/llamacpp-wheel.sh: PyPI has the source
  only). Its libraries link the system's OpenMP runtime (``libgomp.so.1``), which slim bases
  lack, so such an image installs Debian's ``libgomp1`` (a 300 kB package, no compilers).
  And no torch: that runner never imports it (numpy samples its logits, xgrammar's C++ masks
  them: runners/xgr.py), so its ``UV_OVERRIDE`` is deploy/llamacpp-overrides.txt, which leaves
  torch (754 MB) and triton out although xgrammar and the runner's package set require them,
  and ``LLM_TORCH_WHEEL`` is not installed there.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from bentoml.images import Image
from packaging.requirements import Requirement

from glue.settings import BuildSettings

PYTHON_VERSION = "3.11"
# A distro name outside BentoML's list: no apt-get layer of compilers (see above).
PREBUILT_DISTRO = "prebuilt"


PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def package_set(extras: Iterable[str], pyproject: Path = PYPROJECT) -> list[str]:
    """pyproject.toml's runtime dependencies and those of ``extras``, each package once (the
    first spec of a name wins), less bentoml: ``bentoml build`` adds the version that built
    the Bento. Empty where no pyproject.toml is (a built Bento's source: its image is built)."""
    if not pyproject.is_file():
        return []
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project.get("dependencies", []))
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    chosen: dict[str, str] = {}
    for spec in specs:
        chosen.setdefault(Requirement(spec).name, spec)
    chosen.pop("bentoml", None)
    return list(chosen.values())


def bento_image(
    settings: BuildSettings, *, extras: Iterable[str], with_runner: bool, llamacpp: bool = False
) -> Image:
    """The image of a Bento whose root service is this one: pyproject's package sets
    ``extras`` (see :func:`package_set`); ``with_runner``: it runs the model, so it installs
    ``LLM_TORCH_WHEEL`` when one is given; ``llamacpp``: its runner runs on llama.cpp, so it
    installs ``LLM_LLAMACPP_WHEEL`` (which it must be given) and the OpenMP runtime."""
    image = Image(
        base_image=settings.base_image, python_version=PYTHON_VERSION, distro=PREBUILT_DISTRO
    )
    packages = package_set(extras)
    if packages:
        image.python_packages(*packages)
    if with_runner and settings.torch_wheel and not llamacpp:
        how = "`make torch-wheel TORCH=cpu` puts the CPU build there"
        image.python_packages(_project_wheel("LLM_TORCH_WHEEL", settings.torch_wheel, how))
    if with_runner and llamacpp and PYPROJECT.is_file():  # (a built Bento's image is built)
        if not settings.llamacpp_wheel:
            raise ValueError(
                "a runner on llama.cpp needs LLM_LLAMACPP_WHEEL, a llama-cpp-python wheel under "
                "wheels/ (PyPI has its source only, and the image has no compilers): "
                "`make build-runner ENGINE=llamacpp` puts the one it built there"
            )
        how = "`make build-runner ENGINE=llamacpp` puts it there"
        image.python_packages(_project_wheel("LLM_LLAMACPP_WHEEL", settings.llamacpp_wheel, how))
        image.run(
            "apt-get update -q && apt-get install -y -q --no-install-recommends libgomp1 "
            "&& rm -rf /var/lib/apt/lists/*"
        )
    return image


# Relative to the Bento's src/, the directory both the lock (`uv pip compile`, on the build
# host) and the image's `uv --directory ./src pip install` run uv in.
CPU_OVERRIDES = "wheels/cpu-overrides.txt"
LLAMACPP_OVERRIDES = "wheels/llamacpp-overrides.txt"


def image_envs(
    settings: BuildSettings,
    *,
    with_runner: bool,
    llamacpp: bool = False,
    pyproject: Path = PYPROJECT,
) -> list[dict[str, str]]:
    """The envs an image needs while it installs its packages: where its runner has the CPU
    build of torch, ``UV_OVERRIDE`` (no triton); where it runs on llama.cpp, another (no torch,
    no triton; see the module's docstring). None in a built Bento (no pyproject.toml: its
    image is built)."""
    if not (with_runner and pyproject.is_file()):
        return []
    if llamacpp:
        overrides, what, how = (
            LLAMACPP_OVERRIDES,
            "torch and triton",
            "make build-runner ENGINE=llamacpp",
        )
    elif settings.torch_wheel and "+cpu" in Path(settings.torch_wheel).name:
        overrides, what, how = CPU_OVERRIDES, "triton", "make torch-wheel TORCH=cpu"
    else:
        return []
    if not (pyproject.parent / overrides).is_file():
        raise ValueError(
            f"{overrides} (the overrides that keep {what} out of the runner's image) is "
            f"missing: `{how}` puts it there"
        )
    return [{"name": "UV_OVERRIDE", "value": overrides}]


def _project_wheel(setting: str, path: str, how: str) -> str:
    """A wheel inside the build context, as the image installs it: the Bento packs it under
    src/wheels/, and BentoML installs it from there, so the image needs no index that has it."""
    wheel = path.removeprefix("./")
    if not (wheel.startswith("wheels/") and wheel.endswith(".whl") and Path(wheel).is_file()):
        raise ValueError(
            f"{setting}={path!r}: name a .whl file under wheels/ in the project ({how})"
        )
    return f"./{wheel}"
