"""The API service's settings (``LLM_<NAME>`` in the environment): the prompt policy and
request defaults, the business-logic pipeline, the gate, the API's resources, and how it
reaches its runner. What the runner reads too is :class:`contract.settings.CommonSettings`.

Service resources (workers, CPU, memory, timeouts) are read when ``service.py`` is imported,
so they apply to ``bentoml serve`` and are recorded by ``bentoml build``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from contract.settings import CommonSettings, settings_of
from logic.pii import DEFAULT_MASK


class APISettings(CommonSettings):
    """Settings of the API service (business logic, gate, resources, its runner)."""

    served_model_name: str | None = Field(
        None,
        description="Model id shown in /v1/models and responses (default: the tag's name).",
    )
    runner_url: str | None = Field(
        None,
        description="The runner the API talks to, when it runs elsewhere (`http://HOST:PORT`): "
        "or several, comma-separated, and host names that resolve to several addresses (a "
        "Kubernetes headless Service), each address a replica. Set when `bentoml build` runs, "
        "the Bento holds the API alone: no runner, no torch and no weights "
        "(bentofile.api.yaml); set at run time, it points that API at its runners.",
    )
    system_prompt: str | None = Field(
        "You are a helpful AI assistant.",
        description="System prompt added when a request has none; empty leaves the template's own.",
    )
    default_max_tokens: int = Field(
        512, ge=1, description="Completion budget when a request sets no max_tokens."
    )

    # Business-logic pipeline (logic/pipeline.py): step names, comma-separated, in order.
    pre_steps: str = Field(
        "system_prompt,input_limits",
        description="Steps on the conversation before templating (built in: system_prompt, "
        "input_limits, redact_pii; or your own, see step_modules).",
    )
    post_steps: str = Field(
        "strip_template_artefacts,strip_trailing_whitespace",
        description="Steps on a whole answer (built in: strip_template_artefacts, "
        "strip_trailing_whitespace). Streams get the same cleanup incrementally.",
    )
    answer_steps: str = Field(
        "",
        description="Steps that see each complete answer's text, streamed or not (checks, "
        "audit records; none built in: register_answer_step in your step_modules).",
    )
    redact_pii: bool = Field(
        False,
        description="Mask e-mail addresses, phone and card numbers before the prompt reaches "
        "the model (runs first, before pre_steps).",
    )
    pii_mask: str = Field(
        DEFAULT_MASK,
        description="redact_pii: how a masked value is written; {kind} becomes EMAIL, PHONE or "
        "CARD.",
    )
    step_modules: str = Field(
        "", description="Modules to import (comma-separated) that register your own steps."
    )
    max_messages: int | None = Field(256, ge=1, description="input_limits: messages per request.")
    max_message_chars: int | None = Field(
        32_768, ge=1, description="input_limits: characters per message."
    )
    max_input_chars: int | None = Field(
        131_072, ge=1, description="input_limits: characters in all messages."
    )

    # The gate in front of /v1.
    api_key: SecretStr | None = Field(
        None,
        description="When set, /v1 requests must send 'Authorization: Bearer <key>' (else 401).",
    )
    cors_allow_origins: str = Field(
        "",
        description="Origins allowed to call /v1 from a browser, comma-separated (`*` for "
        "any); empty (the default) sends no CORS headers.",
    )
    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body accepted (else 413)."
    )
    max_concurrent_requests: int = Field(
        256, ge=1, description="Requests one API worker serves at once (more get a 429)."
    )

    # Resources (recorded in the Bento; BentoCloud and the manifests size pods by them).
    api_workers: int = Field(2, ge=1, description="API service worker processes.")
    api_cpu: str = Field("2", description="CPU the API service asks for, e.g. 2 or 500m.")
    api_memory: str = Field("2Gi", description="Memory the API service asks for.")
    api_timeout: int = Field(
        300,
        ge=1,
        description="Longest a request may take, in seconds: past it the generation is "
        "stopped and the client gets a 504 (or an error event in its stream).",
    )
    stream_idle_timeout: float | None = Field(
        60.0,
        gt=0,
        description="Longest wait for the model's next tokens, in seconds, waiting for a batch "
        "slot included: past it the generation is stopped (504 or an error event).",
    )

    # The runner, seen from the API.
    ready_requires_runner: bool = Field(
        True,
        description="The API's /readyz also waits for the runner's. Turn off where the runner "
        "is placed or scaled apart (Kubernetes, scale to zero): the API then stays in rotation "
        "and answers 503 itself while no runner is up.",
    )
    runner_routing: Literal["prefix", "least_loaded", "round_robin"] = Field(
        "prefix",
        description="Several runner replicas: which serves a request. prefix: the one expected "
        "to hold the longest run of the prompt's KV blocks, among those within "
        "runner_balance_slack requests of the least loaded; least_loaded; round_robin.",
    )
    runner_balance_slack: int = Field(
        2,
        ge=0,
        description="prefix routing: how many more requests in flight than the least loaded "
        "replica a replica may have and still be chosen for its cached prefix.",
    )
    runner_prefix_min_match: float = Field(
        0.5,
        ge=0,
        le=1,
        description="prefix routing: the share of a prompt's full KV blocks a replica must "
        "hold for the prompt to go there for its cache; below it (a new conversation) the "
        "request goes where a hash of it says, among the replicas within the slack.",
    )
    runner_probe_interval: float = Field(
        2.0,
        gt=0,
        description="Several runner replicas: seconds between checks of each one's /readyz "
        "and load; one that fails leaves the rotation until it answers again.",
    )
    runner_dns_refresh: float = Field(
        5.0,
        gt=0,
        description="Seconds between resolutions of runner host names (new replicas join, "
        "gone ones leave).",
    )
    runner_prefix_index_blocks: int = Field(
        100_000,
        ge=1,
        description="prefix routing: KV block hashes remembered per replica (least recently "
        "sent first out); 16 bytes and some overhead each.",
    )
    runner_prefix_index_ttl: float = Field(
        600.0,
        gt=0,
        description="prefix routing: seconds a block sent to a replica is assumed still cached "
        "there.",
    )
    runner_connect_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds the API waits to connect to the runner before answering 503.",
    )

    @property
    def model_name(self) -> str:
        """The name exposed to clients."""
        return self.served_model_name or self.model.split(":", 1)[0]

    def router_options(self) -> dict[str, object]:
        """The runner replicas' router settings (``api.router.RouterSettings``' fields)."""
        return {
            "policy": self.runner_routing,
            "balance_slack": self.runner_balance_slack,
            "min_match": self.runner_prefix_min_match,
            "probe_interval": self.runner_probe_interval,
            "dns_refresh": self.runner_dns_refresh,
            "index_blocks": self.runner_prefix_index_blocks,
            "index_ttl": self.runner_prefix_index_ttl,
        }


def get_settings() -> APISettings:
    """The API process's settings, validated once, as the environment gives them. Served from
    a built Bento, the model is the version it recorded: ``service.settings`` (the one the
    services use) is that, made by ``glue.bento.pin_bento_model``."""
    return settings_of(APISettings)
