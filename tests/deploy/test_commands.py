"""The commands of the images, compose and deploy/README.md, run for real where they can be:
the container's CMD and HEALTHCHECK, the trainer's fit+export script rolling a new version
into a running API, the multi-worker command, and the README's tool commands."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import FER_MINI, photo
from tests.deploy import kustomize
from tests.deploy.conftest import (
    COMPOSE,
    README,
    ROOT,
    VENV_BIN,
    Server,
    dockerfile_stages,
    exec_form,
    free_port,
    healthcheck_command,
    load_yaml,
    run,
    service_env,
    serving,
    stage,
    tool,
    wait_for,
)
from tests.deploy.headers import HEADER_CAP, SEGMENT, status_with_header


# -- the container's own commands -----------------------------------------------------------
def test_container_command_serves_health_readiness_and_metrics(api_server: Server) -> None:
    assert httpx.get(f"{api_server.url}/healthz").json()["status"] == "ok"
    ready = httpx.get(f"{api_server.url}/readyz")
    assert ready.status_code == 200 and ready.json()["models_loaded"] >= 2
    metrics = httpx.get(f"{api_server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "fer_models_loaded" in metrics.text


def healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    command = healthcheck_command(stage("cpu"))
    command[2] = command[2].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    command[0] = str(VENV_BIN / "python")
    return run(command, timeout=30)


def test_healthcheck_command_passes_on_a_live_service(api_server: Server) -> None:
    result = healthcheck(api_server.port)
    assert result.returncode == 0, result.stderr


def test_healthcheck_command_fails_when_nothing_listens() -> None:
    assert healthcheck(free_port()).returncode != 0


def test_container_command_caps_request_headers(api_server: Server) -> None:
    # httptools, uvicorn's default parser, reads headers of any size: 8 MB answered 200.
    assert status_with_header(api_server.port, HEADER_CAP // 2) == 200
    for size in (HEADER_CAP + SEGMENT, 8 * 1024 * 1024):
        assert status_with_header(api_server.port, size) == 400, size
    assert httpx.get(f"{api_server.url}/readyz").status_code == 200  # and it goes on serving


def test_make_serve_runs_the_image_command() -> None:
    # --no-print-directory: under `make test` (a nested make) the dry run would otherwise
    # end with a "make[1]: Leaving directory" line.
    result = run(["make", "--no-print-directory", "-n", "serve", "HOST=0.0.0.0", "PORT=8000"],
                 cwd=ROOT)
    assert result.returncode == 0, result.stderr
    uvicorn = shlex.split(result.stdout.strip().splitlines()[-1])
    assert Path(uvicorn[0]).name == "uvicorn"
    assert ["uvicorn", *uvicorn[1:]] == exec_form(stage("cpu").last("CMD"))


# -- rolling out a model version: the compose trainer into a running API ----------------------
def trainer_script() -> str:
    """The trainer's shell script, as compose hands it to `sh -ec` (`$$` is `$`)."""
    trainer = load_yaml(COMPOSE)["services"]["trainer"]
    assert trainer["entrypoint"] == ["/bin/sh", "-ec"]
    (script,) = trainer["command"]
    return script.replace("$$", "$")


def versions(api_server: Server, name: str) -> list[int]:
    models = httpx.get(f"{api_server.url}/v1/models", timeout=10).json()["models"]
    return [v["version"] for m in models if m["name"] == name for v in m["versions"]]


@pytest.mark.slow
def test_trainer_writes_the_next_version_and_the_api_loads_it(
    api_server: Server, tmp_path: Path
) -> None:
    before = versions(api_server, "cnn10")
    assert before, "the store starts with a cnn10 version"
    workdir = tmp_path / "app"  # the trainer image's /app, with compose's mounts
    workdir.mkdir()
    (workdir / "model_store").symlink_to(api_server.store)  # ./model_store:/app/model_store
    (workdir / "runs").mkdir()
    (workdir / ".cache").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FER_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        TRAIN_MODEL="cnn10",
        TRAIN_DATA=str(FER_MINI),  # compose mounts FER2013 at /data
        TRAIN_ARGS="--epochs 1 --max-batches-per-epoch 1 --batch-size 16 --threads 1",
        EXPORT_ARGS="",
    )
    result = run(["/bin/sh", "-ec", trainer_script()], cwd=workdir, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    exported = json.loads(result.stdout.strip().splitlines()[-1])
    expected = max(before) + 1
    assert exported["folder"] == f"model_store/cnn10/{expected}"
    assert (api_server.store / "cnn10" / str(expected) / "model.onnx").is_file()
    (run_dir,) = (workdir / "runs").iterdir()
    assert (run_dir / "best.pt").is_file()

    # The API polls its store (FER_RELOAD_INTERVAL_S=1 here, 30 by default) and loads it.
    wait_for(lambda: expected in versions(api_server, "cnn10"), 60, f"cnn10 v{expected} loaded")
    response = httpx.post(
        f"{api_server.url}/predict",
        params={"model": "cnn10"},
        files={"image": ("face.jpg", photo(), "image/jpeg")},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["version"] == expected  # requests naming no version get the newest
    old = httpx.post(
        f"{api_server.url}/predict",
        params={"model": "cnn10", "version": before[0]},
        files={"image": ("face.jpg", photo(), "image/jpeg")},
        timeout=30,
    )
    assert old.status_code == 200 and old.json()["version"] == before[0]


# -- deploy/README.md -------------------------------------------------------------------------
def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def docker_run_parts(command: str) -> tuple[dict[str, str], str, list[str]]:
    """`docker run [options] IMAGE [ARGS]`: its -e variables, the image and the args."""
    words = shlex.split(command)
    assert words[:2] == ["docker", "run"]
    env, i = {}, 2
    while words[i].startswith("-"):
        if words[i] in ("-e", "-p", "-v", "--gpus"):
            if words[i] == "-e":
                key, _, value = words[i + 1].partition("=")
                env[key] = value
            i += 2
        else:
            i += 1
    return env, words[i], words[i + 1 :]


@pytest.mark.slow
def test_readme_multi_worker_command(deploy_store: Path, tmp_path: Path) -> None:
    (command,) = [c for c in readme_commands() if "--workers" in c]
    env, image, args = docker_run_parts(command)
    assert image == "fer-service:cpu" and args[:2] == ["sh", "-c"]
    script = args[2]
    assert f"exec {shlex.join(exec_form(stage('cpu').last('CMD')))} --workers" in script
    port = free_port()
    script = script.replace("--host 0.0.0.0 --port 8000", f"--host 127.0.0.1 --port {port}")
    multiproc = tmp_path / "metrics"  # the README's /tmp/metrics
    env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
    full_env = service_env(deploy_store, FER_RELOAD_INTERVAL_S="0", **env)
    with serving(
        ["/bin/sh", "-c", script], port, full_env, tmp_path, tmp_path / "uvicorn.log"
    ) as url:
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(6):
                assert client.get("/healthz").status_code == 200
            pids = {p.stem.rsplit("_", 1)[1] for p in multiproc.glob("counter_*.db")}
            assert len(pids) >= 2, "two worker processes"
            # Whichever worker answers the scrape, it reports the requests of all of them.
            for _ in range(4):
                text = client.get("/metrics").text
                match = re.search(
                    r'fer_requests_total\{endpoint="/healthz",method="GET",status="200"\} (\S+)',
                    text,
                )
                assert match and float(match.group(1)) == 6, text[:2000]


def test_readme_docker_and_compose_commands_name_real_targets_services_and_profiles() -> None:
    targets = {s.name for s in dockerfile_stages()}
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    profiles = {p for s in services.values() for p in s.get("profiles", [])}
    seen = set()
    for command in readme_commands():
        words = shlex.split(re.sub(r"^(\w+=(\$\([^)]*\)|\S+)\s+)+", "", command))  # no VAR=value
        if words[:2] == ["docker", "build"]:
            target = (
                words[words.index("--target") + 1]
                if "--target" in words
                else dockerfile_stages()[-1].name
            )
            assert target in targets and words[words.index("-t") + 1] == f"fer-service:{target}"
            seen.add("build")
        elif words[:2] == ["docker", "run"]:
            _, image, args = docker_run_parts(command)
            assert image.split(":")[1] in targets
            if "-p" in words:
                assert words[words.index("-p") + 1].endswith(":8000")
            if image == "fer-service:train":
                assert args == exec_form(stage("train").last("CMD"))  # tested above
            seen.add("run")
        elif words[:2] == ["docker", "compose"]:
            used = [words[i + 1] for i, w in enumerate(words) if w == "--profile"]
            assert set(used) <= profiles
            named = [w for w in words[2:] if w in services]
            for name in named:
                assert set(services[name].get("profiles", [])) <= set(used), (name, used)
            seen.add("compose")
        elif words[:2] == ["kubectl", "apply"] or words[:2] == ["kubectl", "kustomize"]:
            folder = ROOT / words[-1]
            assert (folder / "kustomization.yaml").is_file()
            assert kustomize.build(folder)
            if words[1] == "kustomize" and shutil.which("kubectl"):
                result = run(words, cwd=ROOT)
                assert result.returncode == 0, result.stderr
            seen.add("kubectl")
        elif words[0] in ("promtool", "hadolint"):
            result = run([tool(words[0]), *words[1:]], cwd=ROOT)
            assert result.returncode == 0, (command, result.stdout + result.stderr)
            seen.add(words[0])
        else:
            pytest.fail(f"deploy/README.md gives a command no test knows: {command}")
    assert seen == {"build", "run", "compose", "kubectl", "promtool", "hadolint"}
