"""The deployment files in deploy/: Kubernetes manifests against Kubernetes' own object
schemas (strict: unknown fields fail), the BentoCloud config against the schema `bentoml
deploy` structures it with, and all of them against what the Bento really serves."""

from __future__ import annotations

import types
import typing

import attrs
import kubernetes_validate
import pytest
import yaml

from contract.engine import EngineStats
from runners.metrics import engine_metrics
from tests.served import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SERVICES = {"ChatAPI", "LLMRunner"}


def _k8s_objects() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects = []
    for resource in kustomization["resources"]:
        objects += [doc for doc in yaml.safe_load_all((K8S / resource).read_text()) if doc]
    return objects


def _one(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_kustomization_lists_every_manifest_in_the_folder():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml",
        "prometheus-adapter-values.yaml",  # Helm values for the adapter, not an object
    }
    assert set(kustomization["resources"]) == manifests


@pytest.mark.parametrize(
    "obj", _k8s_objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}"
)
def test_each_manifest_is_a_valid_kubernetes_object(obj):
    version = kubernetes_validate.utils.latest_version()
    kubernetes_validate.validate(obj, version, strict=True)  # raises on any violation


def test_a_manifest_with_an_unknown_field_is_refused():
    """The schema check is not a formality: a misspelt field fails it."""
    deployment = _one(_k8s_objects(), "Deployment", "llm-runner")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.utils.latest_version(), True)


def test_api_and_runner_are_two_deployments_of_their_own_images_wired_by_the_runner_service():
    objects = _k8s_objects()
    api, runner = (_one(objects, "Deployment", n) for n in ("llm-api", "llm-runner"))
    # The API's image has no torch and no weights; the runner's has both (tests/containers).
    assert _container(api)["image"] == "llm-bundle-api"
    assert _container(runner)["image"] == "llm-bundle-runner"
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    assert {i["name"] for i in kustomization["images"]} == {"llm-bundle-api", "llm-bundle-runner"}

    assert _container(runner)["args"][:3] == ["start-http-server", "--service-name", "LLMRunner"]
    assert "--depends" not in _container(api)["args"]
    url = {e["name"]: e.get("value") for e in _container(api)["env"]}["LLM_RUNNER_URL"]
    service = _one(objects, "Service", "llm-runner")
    assert url == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    for deployment in (api, runner):  # each Service selects its Deployment's pods
        name = deployment["metadata"]["name"]
        selector = _one(objects, "Service", name)["spec"]["selector"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()


def test_the_runner_service_is_headless_so_the_api_sees_each_runner_pod():
    """One DNS address per ready runner pod, which the API's router resolves and routes
    between (api/router.py); a ClusterIP would hide the pods behind kube-proxy."""
    service = _one(_k8s_objects(), "Service", "llm-runner")
    assert service["spec"]["clusterIP"] == "None"
    assert not service["spec"].get("publishNotReadyAddresses")  # a loading pod is not routed


def test_the_runner_gets_a_gpu_node_and_both_have_probes_and_resource_requests():
    objects = _k8s_objects()
    runner = _one(objects, "Deployment", "llm-runner")
    pod = runner["spec"]["template"]["spec"]
    assert _container(runner)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    for name in ("llm-api", "llm-runner"):
        container = _container(_one(objects, "Deployment", name))
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    api_env = {e["name"]: e for e in _container(_one(objects, "Deployment", "llm-api"))["env"]}
    assert api_env["LLM_READY_REQUIRES_RUNNER"]["value"] == "false"
    assert api_env["LLM_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_the_api_scales_on_cpu_and_the_runner_on_a_metric_the_runner_exports():
    objects = _k8s_objects()
    api_hpa, runner_hpa = (
        _one(objects, "HorizontalPodAutoscaler", n) for n in ("llm-api", "llm-runner")
    )
    assert api_hpa["spec"]["scaleTargetRef"]["name"] == "llm-api"
    assert api_hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"

    assert runner_hpa["spec"]["scaleTargetRef"]["name"] == "llm-runner"
    (metric,) = runner_hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    stats = EngineStats()
    engine = types.SimpleNamespace(
        name="native", running=3, waiting=2, max_batch_size=16, max_in_flight=32, closed=False,
        stats=stats, extra_metrics=list,
    )  # fmt: skip
    from tests.served import samples

    exported = samples(engine_metrics(engine))
    assert exported[(name, ())] == 5  # the series the runner serves on /metrics
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    assert [rule["name"]["as"] for rule in adapter["rules"]["custom"]] == [name]


# ---------------------------------------------------------------- BentoCloud


def _check_keys(value: typing.Any, hint: typing.Any, path: str) -> None:
    """Every key of ``value`` is a field of the attrs class ``hint`` stands for (recursively)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        (hint,) = [a for a in args if a is not type(None)]
        return _check_keys(value, hint, path)
    if origin in (list, typing.List):  # noqa: UP006
        for i, item in enumerate(value):
            _check_keys(item, args[0], f"{path}[{i}]")
    elif origin in (dict, typing.Dict) and isinstance(value, dict):  # noqa: UP006
        for key, item in value.items():
            _check_keys(item, args[1], f"{path}.{key}")
    elif attrs.has(hint):
        fields = typing.get_type_hints(hint)
        for key, item in value.items():
            assert key in fields, f"{path}.{key} is not a key BentoML accepts"
            _check_keys(item, fields[key], f"{path}.{key}")


@pytest.mark.parametrize("name", ["bentocloud.yaml", "bentocloud.vllm.yaml"])
def test_the_bentocloud_config_uses_only_keys_bentoml_deploy_accepts(name):
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.cloud.schemas.utils import cattr

    config = yaml.safe_load((DEPLOY / name).read_text())
    # `bentoml deploy -f` reads name, bento and cluster itself; the rest is the schema.
    body = {k: v for k, v in config.items() if k != "cluster"}
    _check_keys(body, CreateDeploymentSchema, "config")
    structured = cattr.structure(body, CreateDeploymentSchema)
    assert set(structured.services) == SERVICES
    runner = structured.services["LLMRunner"]
    assert runner.scaling.min_replicas in (0, 1) and runner.scaling.max_replicas >= 1
    assert structured.services["ChatAPI"].instance_type.startswith("cpu")
    assert structured.secrets and structured.bento.startswith("llm-bundle")


def test_the_vllm_configs_select_the_vllm_bento_and_engine():
    cloud = yaml.safe_load((DEPLOY / "bentocloud.vllm.yaml").read_text())
    assert cloud["bento"] == "llm-bundle-vllm:latest"  # what `make build ENGINE=vllm` names
    runner_env = {e["name"]: e["value"] for e in cloud["services"]["LLMRunner"]["envs"]}
    assert runner_env["LLM_ENGINE"] == "vllm"
    default = yaml.safe_load((DEPLOY / "bentocloud.yaml").read_text())
    assert cloud["services"]["ChatAPI"] == default["services"]["ChatAPI"]  # the API unchanged
    config = _one(_k8s_objects(), "ConfigMap", "llm-bundle-config")
    assert config["data"]["LLM_ENGINE"] == "auto"  # vLLM where the image has it and a GPU
    runner = _compose()["services"]["llm-runner"]
    assert runner["image"] == "${LLM_RUNNER_IMAGE:-llm-bundle-runner:latest}"
    assert runner["environment"]["LLM_ENGINE"] == "${LLM_ENGINE:-auto}"


def test_the_key_check_refuses_a_misspelt_key():
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema

    config = yaml.safe_load((DEPLOY / "bentocloud.yaml").read_text())
    config["services"]["LLMRunner"]["scaling"]["max_replica"] = 3
    with pytest.raises(AssertionError, match="max_replica"):
        _check_keys(config, CreateDeploymentSchema, "config")


# ---------------------------------------------------------------- docker compose


def _compose(*overrides: str) -> dict:
    """deploy/compose.yaml with override files merged over it, as compose merges mappings
    (enough for these files: none of them repeats a list)."""

    def merge(base: dict, override: dict) -> dict:
        merged = dict(base)
        for key, value in override.items():
            both_maps = isinstance(value, dict) and isinstance(base.get(key), dict)
            merged[key] = merge(base[key], value) if both_maps else value
        return merged

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name in overrides:
        compose = merge(compose, yaml.safe_load((DEPLOY / name).read_text()))
    return compose


def test_compose_runs_the_runner_image_and_the_api_image_pointed_at_it():
    compose = _compose()
    runner, api = compose["services"]["llm-runner"], compose["services"]["api"]
    assert runner["image"] == "${LLM_RUNNER_IMAGE:-llm-bundle-runner:latest}"
    assert api["image"] == "${LLM_API_IMAGE:-llm-bundle-api:latest}"
    assert runner["command"][:3] == ["start-http-server", "--service-name", "LLMRunner"]
    assert api["environment"]["LLM_RUNNER_URL"] == "http://llm-runner:3000"
    assert api["depends_on"]["llm-runner"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(runner["healthcheck"]["test"])
    assert api["ports"] == ["${LLM_API_PORT:-3000}:3000"]
    assert "deploy" not in runner  # the hardware is an override's choice


def test_the_gpu_override_reserves_a_gpu_and_the_cpu_one_none():
    gpu = _compose("compose.gpu.yaml")["services"]["llm-runner"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert gpu["environment"]["LLM_DEVICE"] == "cuda"
    cpu = _compose("compose.cpu.yaml")["services"]["llm-runner"]
    assert "deploy" not in cpu and cpu["environment"]["LLM_DEVICE"] == "cpu"


def test_the_replicas_override_scales_the_runner_and_splits_the_cores():
    compose = _compose("compose.cpu.yaml", "compose.replicas.yaml")
    runner, api = compose["services"]["llm-runner"], compose["services"]["api"]
    assert runner["scale"] == 2 and "ports" not in runner  # no host port to collide on
    assert runner["environment"]["LLM_TORCH_THREADS"] == "${LLM_TORCH_THREADS:-1}"
    assert runner["environment"]["LLM_DEVICE"] == "cpu"
    # The service name, which Docker's DNS answers with every replica's address.
    assert api["environment"]["LLM_RUNNER_URL"] == "http://llm-runner:3000"


def _grace(args: list[str]) -> int:
    return int(args[args.index("--timeout-graceful-shutdown") + 1])


@pytest.mark.parametrize("name", ["llm-api", "llm-runner"])
def test_pods_drain_answers_in_flight_before_kubernetes_kills_them(name):
    """The server's own grace period (stop accepting, finish in flight) ends before the
    pod's, so in-flight answers finish rather than being killed with SIGKILL."""
    deployment = _one(_k8s_objects(), "Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert int(pre_stop[1]) + _grace(container["args"]) < pod["terminationGracePeriodSeconds"]


def test_compose_gives_the_same_grace_period():
    compose = _compose()
    for service in compose["services"].values():
        assert _grace(service["command"]) < int(service["stop_grace_period"].rstrip("s"))


def test_the_api_keeps_idle_connections_longer_than_clients_and_proxies_do():
    """A server that closes an idle connection first races the client's next request on it
    (a reset, under load). httpx (the openai client) keeps them 5 s, nginx and cloud load
    balancers 60 s: the API, in Kubernetes and compose, keeps them longer than either."""
    api_args = [
        _container(_one(_k8s_objects(), "Deployment", "llm-api"))["args"],
        _compose()["services"]["api"]["command"],
    ]
    for args in api_args:
        assert int(args[args.index("--timeout-keep-alive") + 1]) > 60
