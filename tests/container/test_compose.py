"""docker-compose.yml brought up for real with docker-compose.local.yml (podman-compose): the
api and Prometheus, which finds the api by its service name and scrapes it. Grafana has no
local image here and stays to its static checks (tests/deploy)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.server import free_port
from tests.conftest import ROOT, photo
from tests.container import podman
from tests.deploy.conftest import COMPOSE, VENV_BIN, tool, wait_for

pytestmark = [pytest.mark.container, pytest.mark.slow]

LOCAL_OVERRIDE = ROOT / "docker-compose.local.yml"


class Stack:
    def __init__(self, tmp_path: Path) -> None:
        self.project = f"fer-test-{podman.RUN_ID}"
        self.api_port, self.prometheus_port = free_port(), free_port()
        # Free ports in place of the override's 8000 and 9090 (a file of the test's own: see
        # docker-compose.local.yml on ${VARIABLES} there).
        ports = tmp_path / "ports.yml"
        ports.write_text(
            "services:\n"
            f"  api:\n    ports: !override\n      - \"127.0.0.1:{self.api_port}:8000\"\n"
            f"  prometheus:\n    ports: !override\n"
            f"      - \"127.0.0.1:{self.prometheus_port}:9090\"\n"
        )
        self.files = [COMPOSE, LOCAL_OVERRIDE, ports]
        self.binary = str(VENV_BIN / "podman-compose") if (VENV_BIN / "podman-compose").exists() \
            else tool("podman-compose")

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        files = [arg for f in self.files for arg in ("-f", str(f))]
        return subprocess.run(
            [self.binary, "-p", self.project, *files, *args], cwd=ROOT, env=podman.env(),
            capture_output=True, text=True, timeout=timeout,
        )

    def containers(self) -> dict[str, dict[str, Any]]:
        """This project's containers by service name, running or not."""
        listed = podman.podman(
            "ps", "-a", "--format", "json", "--filter",
            f"label=com.docker.compose.project={self.project}"
        ).stdout
        return {c["Labels"]["com.docker.compose.service"]: c for c in json.loads(listed or "[]")}

    def leftovers(self) -> list[str]:
        volumes = podman.podman("volume", "ls", "-q").stdout.split()
        networks = podman.podman("network", "ls", "--format", "{{.Name}}").stdout.split()
        return [
            *self.containers(),
            *(v for v in volumes if v.startswith(f"{self.project}_")),
            *(n for n in networks if n.startswith(f"{self.project}_")),
        ]

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(
            f"http://127.0.0.1:{self.prometheus_port}/api/v1/query", params={"query": expr},
            timeout=10
        )
        response.raise_for_status()
        return response.json()["data"]["result"]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path)
    try:
        yield stack
    finally:
        stack.compose("down", "-v", "-t", "0")


@pytest.mark.timeout(600)
def test_compose_up_scrape_by_service_name_and_down(stack: Stack) -> None:
    up = stack.compose("up", "-d", "--no-build")
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    assert set(stack.containers()) == {"api", "prometheus"}  # grafana: its profile, off here

    api = f"http://127.0.0.1:{stack.api_port}"
    wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, 180, "api /readyz")
    for _ in range(3):
        response = httpx.post(
            f"{api}/predict", files={"image": ("face.jpg", photo(), "image/jpeg")}, timeout=60
        )
        assert response.status_code == 200, response.text

    # Prometheus resolves `api` on the compose network (15 s scrape and DNS intervals).
    start = time.monotonic()
    predictions = 'fer_requests_total{job="fer-api",service="api",endpoint="/predict",status="200"}'
    (series,) = wait_for(
        lambda: [s for s in stack.query(predictions) if float(s["value"][1]) >= 3], 120,
        "Prometheus to scrape 3 predictions",
    )
    print(f"\nPrometheus had the predictions {time.monotonic() - start:.0f} s after them")
    (up_series,) = stack.query('up{job="fer-api"}')
    assert up_series["metric"]["service"] == "api" and float(up_series["value"][1]) == 1
    assert not series["metric"]["instance"].startswith("127.0.0.1")  # a container's address
    assert stack.query("fer_models_loaded") and stack.query('ALERTS{alertstate="firing"}') == []

    stop = stack.compose("stop", "-t", "30")
    assert stop.returncode == 0, stop.stderr[-3000:]
    exits = {service: c["ExitCode"] for service, c in stack.containers().items()}
    assert exits == {"api": 0, "prometheus": 0}, exits  # both stopped on SIGTERM, not killed
    down = stack.compose("down", "-v")
    assert down.returncode == 0, down.stderr[-3000:]
    assert stack.leftovers() == []
