"""Fixtures of the deployment checks: the files under test, tools, a real service process."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import yaml

from bench.server import free_port
from tests.conftest import ROOT, build_store

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
README = DEPLOY / "README.md"
K8S = DEPLOY / "k8s"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "fer-service.json"
VENV_BIN = Path(sys.executable).parent
T = TypeVar("T")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def tool(name: str) -> str:
    """A command-line tool from the venv or PATH; absent: skip here, fail in CI."""
    path = VENV_BIN / name if (VENV_BIN / name).exists() else shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} must be installed in CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return str(path)


def run(args: list[str], timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def load_yaml(path: Path) -> object:
    return yaml.safe_load(path.read_text())


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2
) -> T:
    """Poll `predicate` until it returns something truthy; its last value, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}")
        time.sleep(interval)


# -- the Dockerfile, parsed -----------------------------------------------------------------
@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not current):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        current += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            current = ""
    return instructions


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    instructions = dockerfile_instructions(path.read_text())
    args = {}
    stages: list[Stage] = []
    for keyword, rest in instructions:
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, rest
            base = re.sub(
                r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), match.group(1)
            )
            stages.append(Stage(match.group(2) or "", base, []))
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) CMD/ENTRYPOINT/HEALTHCHECK CMD."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    options = stage.last("HEALTHCHECK")
    assert options and " CMD " in f" {options} ", f"stage {stage.name} has no HEALTHCHECK CMD"
    return exec_form(options.split(" CMD ", 1)[1])


def stage(name: str) -> Stage:
    (found,) = [s for s in dockerfile_stages() if s.name == name]
    return found


# -- a real service process, started as the container starts it -----------------------------
@dataclass
class Server:
    url: str
    port: int
    store: Path
    log: Path

    def tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""


def container_command(port: int) -> list[str]:
    """The cpu image's CMD, listening on 127.0.0.1:`port` instead of 0.0.0.0:8000."""
    command = exec_form(stage("cpu").last("CMD"))
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8000"
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    return command


def service_env(store: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FER_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        FER_MODEL_STORE=str(store),
        FER_CPU_THREADS="1",
        FER_ORT_THREADS="1",
        FER_LOG_LEVEL="WARNING",
    )
    env.update(extra)
    return env


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextmanager
def serving(
    command: list[str], port: int, env: dict[str, str], cwd: Path, log: Path, timeout: float = 90
) -> Iterator[str]:
    """Run `command` (a uvicorn on 127.0.0.1:`port`) until the block ends; yields its URL."""
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{shlex.join(command)} exited {process.returncode}:\n{log.read_text()[-4000:]}"
                )
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200

        wait_for(ready, timeout, f"{url}/readyz")
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="session")
def deploy_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of its own (the rollout test adds versions to it): cnn10/1 and resnet/1."""
    return build_store(tmp_path_factory.mktemp("deploy_store"))


@pytest.fixture(scope="session")
def api_server(deploy_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service as the cpu image runs it (its CMD), re-scanning its store every second."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("api")
    log = workdir / "uvicorn.log"
    env = service_env(deploy_store, FER_RELOAD_INTERVAL_S="1")
    with serving(container_command(port), port, env, workdir, log) as url:
        yield Server(url=url, port=port, store=deploy_store, log=log)
