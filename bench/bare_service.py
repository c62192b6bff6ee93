"""A BentoML service with one trivial endpoint: the memory any BentoML worker holds before it
holds a model (``make bench-llamacpp`` compares our runner's overhead with it)."""

from __future__ import annotations

import bentoml


@bentoml.service
class Bare:
    @bentoml.api
    def echo(self, text: str) -> str:
        return text
