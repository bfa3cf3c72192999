"""podman, as the container tests drive it: the CLI, containers that are always removed, and
the options compose gives the api (so a lone `podman run` starts it as compose does)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.server import free_port
from tests.conftest import ROOT
from tests.deploy.conftest import COMPOSE, load_yaml, wait_for

CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
CPU_IMAGE = "localhost/fer-service:cpu"
TRAIN_IMAGE = "localhost/fer-service:train"
PROMETHEUS_IMAGE = "localhost/fer-base/prometheus:debian"
IMAGES = (CPU_IMAGE, TRAIN_IMAGE, PROMETHEUS_IMAGE)
LABEL = "fer.tests=container"  # on every container the tests start; a crashed run's are removed
RUN_ID = uuid.uuid4().hex[:8]
_names = itertools.count(1)


class PodmanError(RuntimeError):
    pass


def env() -> dict[str, str]:
    """The environment of every podman call: deploy/podman/containers.conf unless the caller
    set CONTAINERS_CONF (as deploy/local-images.sh does)."""
    return {**os.environ,
            "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}


def podman(*args: str, timeout: float = 120,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=env()
    )
    if check and result.returncode != 0:
        raise PodmanError(f"podman {' '.join(args)} exited {result.returncode}:\n"
                          f"{result.stderr[-3000:]}")
    return result


def problem() -> str | None:
    """Why containers cannot run here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (.ci/run installs it: apt-get install podman runc ...)"
    try:
        result = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return "podman info did not answer within 60 s"
    if result.returncode != 0:
        return f"podman info failed: {result.stderr.strip()[-1000:]}"
    return None


def missing_images() -> list[str]:
    return [image for image in IMAGES if podman("image", "exists", image, check=False).returncode]


def image_config(image: str) -> dict[str, Any]:
    return json.loads(podman("image", "inspect", image).stdout)[0]


def remove_leftovers() -> None:
    """Containers of an earlier run that was killed before it could remove its own."""
    ids = podman("ps", "-aq", "--filter", f"label={LABEL}").stdout.split()
    if ids:
        podman("rm", "-f", "-t", "0", *ids, check=False)


def compose_api_options() -> list[str]:
    """docker-compose.yml's api hardening, as `podman run` options."""
    api = load_yaml(COMPOSE)["services"]["api"]
    options = []
    if api.get("read_only"):
        # --read-only alone would also mount tmpfs on /run and /var/tmp; compose does not.
        options += ["--read-only", "--read-only-tmpfs=false"]
    for path in api.get("tmpfs", []):
        options += ["--tmpfs", path]
    for capability in api.get("cap_drop", []):
        options += ["--cap-drop", capability]
    for option in api.get("security_opt", []):
        options += ["--security-opt", option.replace(":true", "")]
    return options


@dataclass
class Container:
    name: str
    port: int  # on 127.0.0.1, published to the container's 8000

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict[str, Any]:
        return json.loads(podman("inspect", self.name).stdout)[0]["State"]

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return (result.stdout + result.stderr)[-6000:]

    def exec(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *command, timeout=timeout, check=False)

    def wait_ready(self, timeout: float = 180) -> None:
        def ready() -> bool:
            if not self.state()["Running"]:
                raise PodmanError(f"{self.name} exited:\n{self.logs()}")
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200

        try:
            wait_for(ready, timeout, f"{self.name} /readyz", interval=0.5)
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n{self.logs()}") from None

    def stop(self, grace_s: int) -> float:
        """`podman stop`: SIGTERM, then SIGKILL after `grace_s`; the seconds it took."""
        start = time.monotonic()
        podman("stop", "-t", str(grace_s), self.name, timeout=grace_s + 60)
        return time.monotonic() - start


def name(role: str) -> str:
    return f"fer-test-{RUN_ID}-{role}-{next(_names)}"


@contextmanager
def running(image: str, *options: str, role: str,
            command: tuple[str, ...] = ()) -> Iterator[Container]:
    """`podman run -d` of `image` with its port 8000 on a free 127.0.0.1 port; removed after."""
    container = Container(name(role), free_port())
    podman(
        "run", "-d", "--name", container.name, "--label", LABEL,
        "-p", f"127.0.0.1:{container.port}:8000", *options, image, *command,
    )
    try:
        yield container
    finally:
        podman("rm", "-f", "-t", "0", container.name, check=False)


def volume(host: Path, target: str, mode: str = "ro") -> list[str]:
    return ["-v", f"{host}:{target}:{mode}"]
