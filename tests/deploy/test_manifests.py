"""deploy/kubernetes/ and the Helm chart deploy/helm/sluice/.

Built-in kinds are validated against the Kubernetes OpenAPI schemas offline (kubernetes-validate,
strict: unknown fields fail). The chart is rendered by Helm's own engine (helm-python-sdk wraps
Helm v4 as a library, so no helm binary is needed) with its defaults and with every option on,
and linted. The KEDA ScaledObject and the ServiceMonitor are validated against models generated from
their CRDs' OpenAPI schemas (cloudcoil's pydantic models for KEDA and the Prometheus operator), strict
too: an object must survive a round trip through its model unchanged, so an unknown or misspelt
field fails. KServe's InferenceService has no such package short of the whole KServe server (its
SDK's dependencies), so its fields that matter are checked directly. Every Deployment's arguments must
parse as `sluice serve` flags, its probes hit /health (public, no key), and the grace period
covers preStop plus --shutdown-timeout.
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pydantic
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
from helm_python.chart import Chart, lint

from sluice.entrypoints.cli import build_parser
from sluice.entrypoints.openai.api_server import ALWAYS_PUBLIC

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
CHART = ROOT / "deploy" / "helm" / "sluice"
K8S_VERSION = kubernetes_validate.latest_version()
GRACE_MARGIN_S = 5  # uvicorn's own graceful close after the drain
ALL_ON = {"model": "HuggingFaceTB/SmolLM2-360M-Instruct", "extraArgs": ["--max-num-seqs=32"],
          "apiKey": {"value": "test-key"}, "autoscaling": {"enabled": True},
          "monitoring": {"serviceMonitor": {"enabled": True}}, "cache": {"persistence": False}}


def raw_objects() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def rendered_objects(values: dict | None) -> list[dict]:
    manifests = Chart.load(CHART).render(values, name="sluice", namespace="serving")
    return [doc for name, text in manifests.items() if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


CRD_MODELS = {"ScaledObject": ScaledObject, "ServiceMonitor": ServiceMonitor}


def validate_custom(obj: dict) -> None:
    """Against the CRD's schema: the model checks types and required fields; it drops fields it does
    not know, so comparing its dump with the object catches those."""
    model = CRD_MODELS[obj["kind"]].model_validate(obj)
    assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == obj, f"unknown fields in {obj}"


def check_object(obj: dict) -> None:
    kind = obj["kind"]
    if kind in CRD_MODELS:
        validate_custom(obj)
    if kind == "ScaledObject":
        trigger = obj["spec"]["triggers"][0]
        assert trigger["type"] == "prometheus" and "vllm:num_requests_waiting" in trigger["metadata"]["query"]
        assert float(trigger["metadata"]["threshold"]) > 0
    elif kind == "ServiceMonitor":
        endpoint = obj["spec"]["endpoints"][0]
        assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
    elif kind == "InferenceService":
        check_container(obj["spec"]["predictor"]["containers"][0], grace=None)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises ValidationError
    if kind == "Deployment":
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        container = pod["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/cache", "/tmp"}
        check_container(container, grace=pod["terminationGracePeriodSeconds"])


def check_container(container: dict, grace: int | None) -> None:
    """Its arguments are `sluice serve` flags; probes on /health; grace covers the drain."""
    args = build_parser().parse_args(["serve", *container["args"]])
    assert args.host == "0.0.0.0"
    port = container["ports"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in container:
            get = container[probe]["httpGet"]
            assert get["path"] == "/health" and get["path"] in ALWAYS_PUBLIC
            assert get["port"] in (port.get("name"), port["containerPort"], args.port)
    assert port["containerPort"] == args.port
    if grace is not None:
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert grace >= int(pre_stop[1]) + args.shutdown_timeout + GRACE_MARGIN_S
    env = {e["name"]: e for e in container["env"]}
    if "SLUICE_API_KEY" in env:
        assert "secretKeyRef" in env["SLUICE_API_KEY"]["valueFrom"], "the key comes from a Secret"


def test_every_manifest_is_valid():
    objects = raw_objects()
    assert {o["kind"] for o in objects} == {"Deployment", "Service", "PersistentVolumeClaim", "Secret",
                                             "ScaledObject", "ServiceMonitor", "InferenceService"}
    for obj in objects:
        check_object(obj)


def test_custom_resources_fail_on_unknown_fields_and_wrong_types():
    """The CRD check is not a pass-through: a misspelt field and a number where KEDA wants a string fail."""
    scaled = next(o for o in raw_objects() if o["kind"] == "ScaledObject")
    misspelt = copy.deepcopy(scaled)
    misspelt["spec"]["maxReplicas"] = misspelt["spec"].pop("maxReplicaCount")
    with pytest.raises(AssertionError, match="unknown fields"):
        validate_custom(misspelt)
    wrong_type = copy.deepcopy(scaled)
    wrong_type["spec"]["triggers"][0]["metadata"]["threshold"] = 5
    with pytest.raises(pydantic.ValidationError, match="threshold"):
        validate_custom(wrong_type)
    monitor = next(o for o in raw_objects() if o["kind"] == "ServiceMonitor")
    monitor = copy.deepcopy(monitor)
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(AssertionError, match="unknown fields"):
        validate_custom(monitor)


def test_shutdown_timeout_is_the_servers_default():
    """The manifests spell out --shutdown-timeout; it should be the server's own default."""
    default = build_parser().parse_args(["serve"]).shutdown_timeout
    deployment = next(o for o in raw_objects() if o["kind"] == "Deployment")
    args = build_parser().parse_args(["serve", *deployment["spec"]["template"]["spec"]["containers"][0]["args"]])
    assert args.shutdown_timeout == default
    assert yaml.safe_load((CHART / "values.yaml").read_text())["shutdownTimeout"] == default


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-on"])
def test_chart_renders_valid_objects(values):
    objects = rendered_objects(values)
    kinds = {o["kind"] for o in objects}
    if values is None:
        assert kinds == {"Deployment", "Service", "PersistentVolumeClaim"}
    else:
        assert kinds == {"Deployment", "Service", "Secret", "ScaledObject", "ServiceMonitor"}
        deployment = next(o for o in objects if o["kind"] == "Deployment")
        assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[0] == ALL_ON["model"] and "--max-num-seqs=32" in args
    for obj in objects:
        check_object(obj)


def test_chart_lints_clean():
    report = lint(CHART, strict=True)
    assert report["errors"] == []
    assert all(m["severity"] <= 1 for m in report["messages"]), report["messages"]  # info only
