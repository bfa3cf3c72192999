"""Rolling out model versions into running API containers: the train image exports the next
version into the store an API container serves read-only, and a rollout under load (a new
version, then SIGTERM as Kubernetes sends it) loses no request."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.card import CARD_FILENAME
from tests.conftest import FER_MINI, photo
from tests.container import podman
from tests.container.conftest import app_owned
from tests.container.load import Load, summary
from tests.container.podman import CPU_IMAGE, TRAIN_IMAGE, Container
from tests.deploy.conftest import COMPOSE, load_yaml, wait_for

pytestmark = [pytest.mark.container, pytest.mark.slow]

RELOAD_INTERVAL_S = 2
GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds


@pytest.fixture
def api(resnet_store: Path) -> Iterator[Container]:
    """The cpu image serving `resnet_store`, mounted read-only as compose mounts its store."""
    with podman.running(
        CPU_IMAGE, *podman.compose_api_options(),
        *podman.volume(resnet_store, "/app/model_store", "ro"),
        "-e", f"FER_RELOAD_INTERVAL_S={RELOAD_INTERVAL_S}",
        "-e", "FER_DEFAULT_MODEL=resnet", "-e", "FER_ENSEMBLE=",
        role="api",
    ) as container:
        container.wait_ready()
        yield container


def versions(api: Container, name: str = "resnet") -> list[int]:
    models = httpx.get(f"{api.url}/v1/models", timeout=10).json()["models"]
    return [v["version"] for m in models if m["name"] == name for v in m["versions"]]


def predict(api: Container, **params: object) -> httpx.Response:
    return httpx.post(
        f"{api.url}/predict", params=params,
        files={"image": ("face.jpg", photo(), "image/jpeg")}, timeout=60,
    )


def trainer_script() -> str:
    """docker-compose.yml's trainer script, as compose hands it to `sh -ec` (`$$` is `$`)."""
    trainer = load_yaml(COMPOSE)["services"]["trainer"]
    assert trainer["entrypoint"] == ["/bin/sh", "-ec"]
    (script,) = trainer["command"]
    return script.replace("$$", "$")


def test_the_train_image_has_the_cpu_build_of_torch() -> None:
    check = (
        "import importlib.metadata as m, torch; "
        "print(torch.__version__, torch.version.cuda, "
        "sorted(d.metadata['Name'] for d in m.distributions() "
        "if d.metadata['Name'].startswith(('nvidia', 'cuda', 'triton'))))"
    )
    result = podman.podman("run", "--rm", "--network", "none", "--entrypoint", "python",
                           TRAIN_IMAGE, "-c", check)
    version, cuda, gpu_packages = result.stdout.strip().split(" ", 2)
    assert version.endswith("+cpu") and cuda == "None" and gpu_packages == "[]", result.stdout


@pytest.mark.timeout(600)
def test_the_train_image_exports_a_version_that_the_running_api_serves(
    api: Container, resnet_store: Path, tmp_path: Path
) -> None:
    assert versions(api) == [1]
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    for folder in (runs, cache):
        folder.mkdir()
        app_owned(folder)
    result = podman.podman(
        "run", "--rm", "--network", "none", "--label", podman.LABEL,
        *podman.volume(FER_MINI, "/data", "ro"),  # compose: ${FER2013}:/data:ro
        *podman.volume(resnet_store, "/app/model_store", "rw"),
        *podman.volume(runs, "/app/runs", "rw"), *podman.volume(cache, "/app/.cache", "rw"),
        "-e", "TRAIN_MODEL=resnet", "-e", "TRAIN_DATA=/data", "-e", "EXPORT_ARGS=",
        "-e", "TRAIN_ARGS=--epochs 1 --max-batches-per-epoch 2 --batch-size 16 --threads 1",
        "--entrypoint", "/bin/sh", TRAIN_IMAGE, "-ec", trainer_script(),
        timeout=480,
    )
    exported = json.loads(result.stdout.strip().splitlines()[-1])
    assert exported["folder"] == "model_store/resnet/2"
    assert (resnet_store / "resnet" / "2" / "model.onnx").is_file()
    (run,) = runs.iterdir()
    assert (run / "best.pt").is_file()

    start = time.monotonic()
    wait_for(lambda: 2 in versions(api), 60 + 3 * RELOAD_INTERVAL_S, "resnet v2 loaded")
    print(f"resnet v2 served {time.monotonic() - start:.1f} s after its export "
          f"(FER_RELOAD_INTERVAL_S={RELOAD_INTERVAL_S})")
    newest = predict(api)
    assert newest.status_code == 200 and newest.json()["version"] == 2, newest.text
    pinned = predict(api, version=1)
    assert pinned.status_code == 200 and pinned.json()["version"] == 1, pinned.text


def add_version(store: Path, name: str, source: int, version: int) -> None:
    """A copy of `source` as `version` (its card says so), staged beside it and renamed in,
    as `train export` writes one (the API never sees half a folder)."""
    staging = store / name / f".staging-{version}"
    shutil.copytree(store / name / str(source), staging)
    card = json.loads((staging / CARD_FILENAME).read_text())
    (staging / CARD_FILENAME).write_text(json.dumps({**card, "version": version}, indent=2))
    app_owned(staging)
    staging.rename(store / name / str(version))


@pytest.mark.timeout(600)
def test_a_rollout_under_load_loses_no_request(api: Container, resnet_store: Path) -> None:
    load = Load(api.url, photo(), max_requests=5000).start()
    try:
        wait_for(lambda: load.answered() >= 20 or not load.running(), 120, "20 answers")
        add_version(resnet_store, "resnet", source=1, version=2)
        wait_for(lambda: load.answered(version=2) >= 10 or not load.running(), 120,
                 "10 answers from the new version")
        signalled = time.monotonic()  # before podman stop sends SIGTERM: a stricter split
        stop_s = api.stop(GRACE_S)
        exit_code = api.state()["ExitCode"]
        wait_for(lambda: not load.running(), 60, "the load to see the server gone")
    finally:
        load.stop()

    before = [o for o in load.outcomes if o.sent < signalled]
    after = [o for o in load.outcomes if o.sent >= signalled]
    in_flight = [o for o in before if o.done >= signalled]
    print(f"\nrollout: {len(load.outcomes)} requests; sent before SIGTERM: {len(before)} "
          f"({summary(before)}), {len(in_flight)} of them in flight at the signal "
          f"({summary(in_flight)}); after: {len(after)} ({summary(after)}); "
          f"container exited {exit_code} {stop_s:.1f} s after podman stop (grace {GRACE_S} s)")
    assert load.answered(version=1) and load.answered(version=2) >= 10
    assert in_flight, "no request was in flight at SIGTERM: nothing was drained"
    lost = [o for o in before if not (o.status == 200 or (o.status == 503 and o.retry_after))]
    assert not lost, f"{len(lost)} requests sent before SIGTERM were lost: {summary(lost)}"
    assert exit_code == 0, f"killed or failed (exit {exit_code}):\n{api.logs()}"
    assert stop_s < GRACE_S
