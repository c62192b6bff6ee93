"""What ``bentoml build`` reads besides the services' own settings: the image's base and the
wheels it installs from the project (``LLM_<NAME>`` in the environment)."""

from __future__ import annotations

from pydantic import Field

from contract.settings import LLMSettings, settings_of


class BuildSettings(LLMSettings):
    """Build time only: how the Bentos' images are made."""

    base_image: str = Field(
        "python:3.11-slim",
        description="Build time: the base image of the Bentos' containers (`make base-image` "
        "builds one from Debian's packages where Docker Hub cannot be reached).",
    )
    torch_wheel: str | None = Field(
        None,
        description="Build time: a torch wheel under wheels/ that the runner's image installs "
        "instead of PyPI's (CUDA) torch, e.g. the CPU build (`make build-runner TORCH=cpu`).",
    )
    llamacpp_wheel: str | None = Field(
        None,
        description="Build time: the llama-cpp-python wheel under wheels/ that the image of a "
        "runner on llama.cpp installs (PyPI has its source only, and the images have no "
        "compilers); `make build-runner ENGINE=llamacpp` puts the one deploy/llamacpp-wheel.sh "
        "built there.",
    )


def build_settings() -> BuildSettings:
    return settings_of(BuildSettings)
