"""What both sides of the hop read alike: which model, the runner's timeout, logs and the
``/metrics`` key; and how the API's tokenizer entry is named beside the runner's model.

Each owner keeps the rest of its settings in a class of its own, all read from the
environment with the prefix ``LLM_``:

- the API: :class:`logic.settings.APISettings`;
- the runner and its engines: :class:`runners.settings.RunnerSettings`,
  :class:`runners.settings.NativeEngineSettings`, :class:`runners.settings.VLLMSettings`;
- ``bentoml build``: :class:`glue.settings.BuildSettings`.

``docs/configuration.md`` is generated from these classes (``make config-docs``).
"""

from __future__ import annotations

from functools import cache
from typing import Literal, TypeVar

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "smollm2-135m-instruct"
# The API's store entry beside each model: its tokenizer, chat template and config, no weights
# (runners/import_model.py writes both), so the API's Bento and image carry no weights.
TOKENIZER_SUFFIX = "-tokenizer"


GGUF_SUFFIX = "-gguf"


def gguf_tag(model_tag: str) -> str:
    """The GGUF entry's tag for a model's (``name`` or ``name:version``): the GGUF as shipped
    and the tokenizer files, what a runner on llama.cpp packs; a GGUF entry's own tag as is."""
    name, _, version = model_tag.partition(":")
    if not name.endswith(GGUF_SUFFIX):
        name += GGUF_SUFFIX
    return name + (f":{version}" if version else "")


def tokenizer_tag(model_tag: str) -> str:
    """The tokenizer entry's tag for a model's (``name`` or ``name:version``)."""
    name, _, version = model_tag.partition(":")
    return f"{name}{TOKENIZER_SUFFIX}" + (f":{version}" if version else "")


class LLMSettings(BaseSettings):
    """Base of every settings class here: ``LLM_<FIELD>`` in the environment, validated when
    built; unknown ``LLM_`` variables are left to the classes that own them."""

    model_config = SettingsConfigDict(env_prefix="LLM_", extra="ignore")


class CommonSettings(LLMSettings):
    """Read by both services."""

    model: str = Field(
        DEFAULT_MODEL,
        description="Model store tag, `name` or `name:version`. The runner loads it; the API "
        "loads its tokenizer entry (`<name>-tokenizer`, same version). Inside a built Bento, "
        "the version the Bento recorded.",
    )
    runner_timeout: int = Field(
        300,
        ge=1,
        description="Runner request timeout in seconds; the API waits as long for each next "
        "piece of a runner's stream.",
    )
    metrics_api_key: SecretStr | None = Field(
        None,
        description="When set, /metrics needs 'Authorization: Bearer <key>' (health routes "
        "stay open), on the API and the runner. It may be the API key or a scraper's own.",
    )
    # Logs: one JSON object per line (with the request id), or BentoML's plain text lines.
    log_format: Literal["json", "text"] = Field(
        "json", description="json: structured lines for log pipelines; text: BentoML's format."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of this project's loggers (BentoML's own keep theirs)."
    )

    @property
    def tokenizer_model(self) -> str:
        """The API's store entry: the model's tokenizer entry."""
        return tokenizer_tag(self.model)


S = TypeVar("S", bound=LLMSettings)


@cache
def settings_of(cls: type[S]) -> S:
    """The process-wide settings of one owner, read from the environment and validated once."""
    return cls()
