"""The container tests: the images built from this tree with podman, run for real.

When any of them is selected, `deploy/local-images.sh` builds the images first (from podman's
layer cache: only what changed is rebuilt), unless FER_IMAGES_BUILT=1 says the caller just
did (.ci/run). Where podman cannot run containers they skip with the reason, except under
FER_CONTAINER_TESTS=required (.ci/run sets it once it has seen podman work), where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import COMMITTED_STORE, ROOT
from tests.container import podman

REQUIRED = os.environ.get("FER_CONTAINER_TESTS", "") == "required"
BUILD_LOG = ROOT / ".cache" / "images" / "build.log"
APP_UID = 10001  # the images' USER
_unusable: str | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    global _unusable
    if not any(item.get_closest_marker("container") for item in session.items):
        return
    _unusable = podman.problem()
    if _unusable is not None:
        return
    podman.remove_leftovers()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("FER_IMAGES_BUILT") != "1":
        BUILD_LOG.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with BUILD_LOG.open("w") as log:
            result = subprocess.run(
                [str(ROOT / "deploy" / "local-images.sh"), "cpu", "train", "prometheus"],
                cwd=ROOT, env=podman.env(), stdout=log, stderr=subprocess.STDOUT,
            )
        if result.returncode != 0:
            _unusable = f"deploy/local-images.sh failed (exit {result.returncode}): see {BUILD_LOG}"
            return
        if reporter:
            reporter.write_line(
                f"tests/container: images built in {time.monotonic() - start:.0f} s ({BUILD_LOG})"
            )
    missing = podman.missing_images()
    if missing:
        _unusable = f"images missing: {', '.join(missing)} (run deploy/local-images.sh)"


# Session scope: pytest sets up wider-scoped fixtures first, so a function-scoped check would
# come after a module's container fixture had already tried (and failed) to start one.
@pytest.fixture(scope="session", autouse=True)
def podman_works() -> None:
    if _unusable is not None:
        if REQUIRED:
            pytest.fail(f"FER_CONTAINER_TESTS=required, but {_unusable}")
        pytest.skip(_unusable)


def app_owned(folder: Path) -> Path:
    """Make `folder` (and everything in it) writable by the images' user."""
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, APP_UID, APP_UID)
    return folder


@pytest.fixture
def resnet_store(tmp_path: Path) -> Iterator[Path]:
    """A store with one small committed model (the oldest resnet kept) as resnet/1, owned
    by the images' user (the trainer writes its next version; the API reads it)."""
    from service.card import CARD_FILENAME, ModelCard

    store = tmp_path / "store"
    oldest = min((p for p in (COMMITTED_STORE / "resnet").iterdir() if p.name.isdigit()),
                 key=lambda p: int(p.name))
    shutil.copytree(oldest, store / "resnet" / "1")
    card = ModelCard.read(store / "resnet" / "1" / CARD_FILENAME)
    card.version = 1
    card.write(store / "resnet" / "1" / CARD_FILENAME)
    yield app_owned(store)
