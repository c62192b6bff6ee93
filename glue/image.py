"""The container image this tree's Bentos build on, read when ``bentoml build`` imports the
services. The Python packages stay in the bentofiles; this sets what goes under them.

- The base image is ``LLM_BASE_IMAGE`` (default ``python:3.11-slim``; ``make base-image``
  builds one from Debian's packages where Docker Hub cannot be reached).
- No compilers. BentoML's image builder apt-installs ``build-essential`` and ``git`` (630 MB)
  as the first step on any base of a distro it knows. Every package we install is a wheel, so
  the image declares a distro BentoML does not know ("prebuilt"), and that step is left out.
  tests/deploy checks the generated Dockerfile for it.
- ``LLM_TORCH_WHEEL``: a torch wheel under ``wheels/`` that images with the runner install
  instead of PyPI's torch (which is the CUDA build), e.g. the CPU build for CPU-only hosts.
  An API-only Bento (``LLM_RUNNER_URL`` set) has no torch at all.
"""

from __future__ import annotations

from pathlib import Path

from bentoml.images import Image

from glue.settings import BuildSettings

PYTHON_VERSION = "3.11"
# A distro name outside BentoML's list: no apt-get layer of compilers (see above).
PREBUILT_DISTRO = "prebuilt"


def bento_image(settings: BuildSettings, *, with_runner: bool) -> Image:
    """The image of a Bento whose root service is this one; ``with_runner``: it runs the
    model, so it installs ``LLM_TORCH_WHEEL`` when one is given."""
    image = Image(
        base_image=settings.base_image, python_version=PYTHON_VERSION, distro=PREBUILT_DISTRO
    )
    if with_runner and settings.torch_wheel:
        # A path inside the build context: the Bento packs it under src/wheels/, and BentoML
        # installs it from there, so the image needs no index that has it.
        wheel = settings.torch_wheel.removeprefix("./")
        if not (wheel.startswith("wheels/") and wheel.endswith(".whl") and Path(wheel).is_file()):
            raise ValueError(
                f"LLM_TORCH_WHEEL={settings.torch_wheel!r}: name a .whl file under wheels/ in the "
                "project (`make torch-wheel TORCH=cpu` puts the CPU build there)"
            )
        image.python_packages(f"./{wheel}")
    return image
