"""docker-compose.yml: valid against the Compose Specification, and consistent with the rest."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import jsonschema
import pytest
from jsonschema.protocols import Validator
from pydantic import ValidationError

from service.settings import Settings
from tests.deploy.conftest import (
    COMPOSE,
    DASHBOARD,
    ROOT,
    dockerfile_stages,
    healthcheck_command,
    load_yaml,
    stage,
)

Compose = dict[str, Any]
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema, as check-jsonschema ships it (vendored
    from compose-spec/compose-spec, refreshed with each check-jsonschema release)."""
    schema = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(schema.read_text())


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with nothing set: the default (`$$` is a literal `$`)."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> Compose:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def validator() -> Validator:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_valid_against_the_compose_specification(compose: Compose, validator: Validator) -> None:
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    "mutation",
    [
        lambda c: c.update(servicse=c.pop("services")),
        lambda c: c["services"]["api"].update(helthcheck={}),
        lambda c: c["services"]["api"].update(ports=8000),
        lambda c: c["services"]["api-gpu"]["deploy"]["resources"]["reservations"].update(
            gpus="all"
        ),
    ],
)
def test_the_schema_catches_mistakes(
    compose: Compose, validator: Validator, mutation: Callable[[Compose], None]
) -> None:
    broken = copy.deepcopy(compose)
    mutation(broken)
    assert list(validator.iter_errors(broken))


def test_services_and_profiles(compose: Compose) -> None:
    services = compose["services"]
    assert set(services) == {"api", "api-gpu", "trainer", "prometheus", "grafana"}
    assert "profiles" not in services["api"]
    assert services["api-gpu"]["profiles"] == ["gpu"]
    assert services["trainer"]["profiles"] == ["train"]
    targets = {s.name for s in dockerfile_stages()}
    for name, target in (("api", "cpu"), ("api-gpu", "gpu"), ("trainer", "train")):
        assert services[name]["build"] == {"context": ".", "target": target}
        assert target in targets
        assert services[name]["image"] == f"fer-service:{target}"


def test_api_serves_port_8000_with_the_store_read_only(compose: Compose) -> None:
    for name, host_port in (("api", 8000), ("api-gpu", 8001)):
        api = compose["services"][name]
        assert api["ports"] == [f"{host_port}:8000"]
        assert "./model_store:/app/model_store:ro" in api["volumes"]
        assert api["environment"]["FER_MODEL_STORE"] == "/app/model_store"
        assert api["read_only"] is True and api["tmpfs"] == ["/tmp"]
        assert api["cap_drop"] == ["ALL"]
        assert "command" not in api and "entrypoint" not in api  # the image's CMD


def test_api_healthcheck_is_the_image_healthcheck(compose: Compose) -> None:
    check = compose["services"]["api"]["healthcheck"]
    assert check["test"][0] == "CMD"
    assert check["test"][1:] == healthcheck_command(stage("cpu"))
    options = stage("cpu").last("HEALTHCHECK")
    for key in ("interval", "timeout", "start_period", "retries"):
        assert f"--{key.replace('_', '-')}={check[key]}" in options


def test_gpu_service_reserves_an_nvidia_gpu(compose: Compose) -> None:
    gpu = compose["services"]["api-gpu"]
    assert gpu["environment"]["FER_DEVICE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"] == 1


def test_every_fer_setting_exists_and_its_default_is_valid(compose: Compose) -> None:
    fields = {f"FER_{name.upper()}": name for name in Settings.model_fields}
    for service in ("api", "api-gpu"):
        environment = compose["services"][service]["environment"]
        assert len(environment) >= 10
        for key, value in environment.items():
            assert key in fields, f"{service}: {key} is no setting of service/settings.py"
            default = interpolate(str(value))
            try:
                Settings.model_validate({fields[key]: default})
            except ValidationError as error:
                pytest.fail(f"{service}: {key}={default!r}: {error}")
            match = INTERPOLATION.fullmatch(str(value))
            if match:
                assert match.group(1) == key, f"{key} reads ${{{match.group(1)}}}"


def test_trainer_mounts_data_store_and_runs_fit_then_export(compose: Compose) -> None:
    trainer = compose["services"]["trainer"]
    volumes = [interpolate(v) for v in trainer["volumes"]]
    assert any(v.endswith(":/data:ro") for v in volumes)
    assert "./model_store:/app/model_store" in volumes  # read-write: export writes here
    assert trainer["entrypoint"] == ["/bin/sh", "-ec"]
    (script,) = trainer["command"]
    assert script.index("python -m train fit") < script.index("python -m train export")
    assert "--store model_store" in script
    assert re.fullmatch(r"\$\{FER_UID:-\d+\}:\$\{FER_GID:-\d+\}", trainer["user"])


def test_prometheus_and_grafana_mount_the_deploy_files(compose: Compose) -> None:
    prometheus = compose["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert (ROOT / "deploy/prometheus/prometheus.yml").is_file()

    grafana = compose["services"]["grafana"]
    mounts = dict(
        v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./")
    )
    for host in mounts:
        assert (ROOT / host).is_dir(), host
    provider = load_yaml(ROOT / "deploy/grafana/provisioning/dashboards/fer.yml")["providers"][0]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    for name, service in compose["services"].items():
        if "image" in service and "build" not in service:
            assert re.search(r":v?\d+\.\d+\.\d+$", service["image"]), f"{name}: pin the image"
