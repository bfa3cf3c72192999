"""The cpu image, started as docker-compose.yml starts it: read-only root, no capabilities, its
own non-root user, the committed models baked in."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from service.card import CLASSES
from tests.conftest import photo
from tests.container import podman
from tests.container.podman import CPU_IMAGE, Container
from tests.deploy.conftest import exec_form, healthcheck_command, stage
from tests.deploy.headers import HEADER_CAP, SEGMENT, status_with_header

pytestmark = [pytest.mark.container, pytest.mark.slow]


@pytest.fixture(scope="module")
def api() -> Iterator[Container]:
    with podman.running(CPU_IMAGE, *podman.compose_api_options(), role="cpu") as container:
        container.wait_ready()
        yield container


def test_the_image_is_the_dockerfile_s_cpu_target() -> None:
    config = podman.image_config(CPU_IMAGE)
    assert config["Config"]["Cmd"] == exec_form(stage("cpu").last("CMD"))
    assert config["Config"]["User"] == stage("cpu").last("USER") == "10001:10001"
    # Built in docker format: OCI images drop HEALTHCHECK.
    assert config["Healthcheck"]["Test"] == ["CMD", *healthcheck_command(stage("cpu"))]


def test_runs_as_its_user_on_a_read_only_root(api: Container) -> None:
    assert api.exec("id", "-u").stdout.strip() == "10001"
    denied = api.exec("touch", "/app/model_store/written")
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    assert api.exec("touch", "/tmp/written").returncode == 0  # compose's tmpfs
    assert api.exec("grep", "-i", "^CapEff", "/proc/1/status").stdout.split()[-1] == "0" * 16


def test_ready_and_predicts_the_faces_of_a_fixture_photo(api: Container) -> None:
    ready = httpx.get(f"{api.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["models_loaded"] >= 2
    response = httpx.post(
        f"{api.url}/predict", files={"image": ("face.jpg", photo(), "image/jpeg")}, timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "cnn10"  # the default: the best model on validation
    (face,) = body["faces"]
    assert face["label"] in CLASSES and set(face["probabilities"]) == set(CLASSES)
    assert abs(sum(face["probabilities"].values()) - 1) < 1e-3


def test_garbage_gets_415_and_it_goes_on_serving(api: Container) -> None:
    response = httpx.post(
        f"{api.url}/predict", content=b"hello, not an image",
        headers={"content-type": "image/jpeg"}, timeout=30,
    )
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"
    assert httpx.get(f"{api.url}/healthz", timeout=10).status_code == 200


def test_healthcheck_passes_inside_the_container(api: Container) -> None:
    result = podman.podman("healthcheck", "run", api.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() in ("", "healthy")


def test_request_headers_are_capped(api: Container) -> None:
    assert status_with_header(api.port, HEADER_CAP // 2) == 200
    for size in (HEADER_CAP + SEGMENT, 8 * 1024 * 1024):
        assert status_with_header(api.port, size) == 400, size
    assert "Invalid HTTP request received" in api.logs()
    assert httpx.get(f"{api.url}/readyz", timeout=10).status_code == 200
