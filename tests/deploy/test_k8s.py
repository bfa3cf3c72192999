"""deploy/k8s: the kustomize output, against the Kubernetes schemas and against itself."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.settings import Settings
from tests.deploy import kustomize
from tests.deploy.conftest import K8S, PROMETHEUS_DIR, load_yaml, run, stage

# The oldest Kubernetes minor still widely run, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
VARIANTS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu"}

Objects = dict[tuple[str, str], dict[str, Any]]
Variant = tuple[str, Objects]


def by_kind(resources: list[dict[str, Any]]) -> Objects:
    objects = {(r["kind"], r["metadata"]["name"]): r for r in resources}
    assert len(objects) == len(resources), "two objects of one kind share a name"
    return objects


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> Variant:
    return request.param, by_kind(kustomize.build(VARIANTS[request.param]))


def one(objects: Objects, kind: str) -> dict[str, Any]:
    (found,) = [o for (k, _), o in objects.items() if k == kind]
    return found


def container(objects: Objects) -> dict[str, Any]:
    (api,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return api


def config(objects: Objects) -> dict[str, str]:
    return one(objects, "ConfigMap")["data"]


# -- rendering ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_renderer_matches_kubectl_kustomize(name: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the python renderer stands alone")
    result = run([kubectl, "kustomize", str(VARIANTS[name])])
    assert result.returncode == 0, result.stderr
    theirs = by_kind([doc for doc in yaml.safe_load_all(result.stdout) if doc])
    assert by_kind(kustomize.build(VARIANTS[name])) == theirs


def test_renderer_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("namePrefix: x-\nresources: []\n")
    with pytest.raises(kustomize.UnsupportedKustomization):
        kustomize.build(tmp_path)


def test_config_map_hash_is_kustomizes() -> None:
    # kubectl kustomize (kustomize v5.5) names the ConfigMap generated from literal a=b
    # x-4h2mbtbbt6.
    assert (
        kustomize.config_map_hash({"metadata": {"name": "x"}, "data": {"a": "b"}}) == "4h2mbtbbt6"
    )


def test_objects(variant: Variant) -> None:
    _, objects = variant
    kinds = sorted(kind for kind, _ in objects)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Service",
            "ServiceMonitor",
        ]
    )


# -- schemas --------------------------------------------------------------------------------
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_kinds_are_valid_kubernetes(variant: Variant, version: str) -> None:
    _, objects = variant
    checked = 0
    for (kind, name), obj in objects.items():
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{kind}/{name} on {version}: {error.message} at {list(error.path)}")
        checked += 1
    assert checked == 5


def test_strict_validation_catches_a_typo(variant: Variant) -> None:
    _, objects = variant
    deployment = yaml.safe_load(yaml.safe_dump(one(objects, "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


# The Prometheus Operator's CRDs (monitoring.coreos.com/v1) ship with the Operator, not with
# kubernetes-validate: these schemas hold the part of them that our objects use.
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
    r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
CRD_SCHEMAS = {
    "ServiceMonitor": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchLabels": STRING_MAP},
                    },
                    "jobLabel": {"type": "string"},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["port"],
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": DURATION,
                                "scrapeTimeout": DURATION,
                                "honorLabels": {"type": "boolean"},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": DURATION,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["expr"],
                                        "oneOf": [
                                            {"required": ["alert"]},
                                            {"required": ["record"]},
                                        ],
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": ["string", "integer"]},
                                            "for": DURATION,
                                            "keep_firing_for": DURATION,
                                            "labels": STRING_MAP,
                                            "annotations": STRING_MAP,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def test_prometheus_operator_objects(variant: Variant) -> None:
    _, objects = variant
    for kind, schema in CRD_SCHEMAS.items():
        obj = one(objects, kind)
        errors = [
            f"{e.json_path}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(obj)
        ]
        assert not errors, f"{kind}: {errors}"


def test_prometheus_rule_holds_the_compose_alerts(variant: Variant) -> None:
    _, objects = variant
    alerts = load_yaml(PROMETHEUS_DIR / "alerts.yml")
    assert one(objects, "PrometheusRule")["spec"]["groups"] == alerts["groups"]


# -- the objects agree with each other --------------------------------------------------------
def test_selectors_ports_and_references_agree(variant: Variant) -> None:
    _, objects = variant
    deployment, service = one(objects, "Deployment"), one(objects, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(service["spec"]["selector"], pod_labels)
    assert selects(
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels
    )
    monitor = one(objects, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])

    container_ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert container_ports == {"http": 8000}
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http" and port["targetPort"] == "http"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # Prometheus names the job after the Service: the alerts select job="fer-api".
    assert service["metadata"]["name"] == "fer-api"

    target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    (source,) = container(objects)["envFrom"]
    assert ("ConfigMap", source["configMapRef"]["name"]) in objects


def test_probes_resources_and_security(variant: Variant) -> None:
    _, objects = variant
    api = container(objects)
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["startupProbe"]["periodSeconds"] * api["startupProbe"]["failureThreshold"] >= 60
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(api["resources"][kind])
    assert "command" not in api and "args" not in api  # the image's CMD: one uvicorn process

    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    user = stage("cpu").last("USER").split(":")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert [
        str(pod["securityContext"]["runAsUser"]),
        str(pod["securityContext"]["runAsGroup"]),
    ] == user
    assert api["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    (tmp,) = api["volumeMounts"]
    assert tmp["mountPath"] == "/tmp"
    assert {"name": tmp["name"], "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]


def test_hpa_scales_on_cpu(variant: Variant) -> None:
    _, objects = variant
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert (
        metric["resource"]["name"] == "cpu"
        and metric["resource"]["target"]["type"] == "Utilization"
    )
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["maxReplicas"]


def cpu_count(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_settings_exist_validate_and_match_the_cpu_limit(variant: Variant) -> None:
    _, objects = variant
    data = config(objects)
    fields = {f"FER_{name.upper()}": name for name in Settings.model_fields}
    unknown = set(data) - set(fields)
    assert not unknown, f"no such settings: {unknown}"
    Settings.model_validate({fields[k]: v for k, v in data.items()})
    limit = cpu_count(container(objects)["resources"]["limits"]["cpu"])
    assert int(data["FER_CPU_THREADS"]) == limit
    assert int(data["FER_ORT_THREADS"]) == 1  # per model session; the members run side by side


def test_base_is_the_cpu_image() -> None:
    objects = by_kind(kustomize.build(VARIANTS["base"]))
    api = container(objects)
    assert api["image"] == "fer-service:cpu"
    assert config(objects)["FER_DEVICE"] == "cpu"
    assert "nvidia.com/gpu" not in api["resources"]["limits"]


def test_gpu_overlay() -> None:
    base = by_kind(kustomize.build(VARIANTS["base"]))
    objects = by_kind(kustomize.build(VARIANTS["gpu"]))
    api = container(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert api["image"] == "fer-service:gpu"
    assert api["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert config(objects)["FER_DEVICE"] == "cuda"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    # Everything else is the base's: probes, security, the other settings.
    for key in ("readinessProbe", "livenessProbe", "startupProbe", "securityContext", "ports"):
        assert api[key] == container(base)[key]
    changed = {k for k in config(base) if config(base)[k] != config(objects)[k]}
    assert changed == {"FER_DEVICE", "FER_CPU_THREADS"}
    # A changed setting renames the ConfigMap, which rolls the pods.
    assert (
        one(objects, "ConfigMap")["metadata"]["name"] != one(base, "ConfigMap")["metadata"]["name"]
    )
