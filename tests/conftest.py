"""Shared fixtures: real photos, a store of real (untrained) ONNX models, a running app."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from bench.server import free_port
from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FACES = FIXTURES / "faces"
FER_MINI = FIXTURES / "fer_mini"
SHARED_FER2013 = ROOT.parent / "shared" / "data" / "fer2013"
SHARED_NATURAL = ROOT.parent / "shared" / "data" / "natural-faces"
COMMITTED_STORE = ROOT / "model_store"

needs_fer2013 = pytest.mark.skipif(
    not (SHARED_FER2013 / "train").is_dir(), reason="FER2013 not present under ../shared/data"
)


def photo(name: str = "happy/Marilyn_Monroe_0002.jpg") -> bytes:
    return (FACES / name).read_bytes()


def gray_photo(name: str = "happy/Marilyn_Monroe_0002.jpg") -> np.ndarray:
    """A fixture photo decoded to grayscale, as the service decodes it."""
    return cv2.imdecode(np.frombuffer(photo(name), np.uint8), cv2.IMREAD_GRAYSCALE)


@pytest.fixture(scope="module")
def retinaface():
    from service.retinaface import RetinaFaceDetector

    return RetinaFaceDetector()


def all_photos() -> list[Path]:
    return sorted(FACES.glob("*/*.jpg"))


def build_store(root: Path) -> Path:
    """Untrained but real networks, exported to ONNX the way `train export` does."""
    import torch

    from service.card import InputSpec
    from train import models
    from train.export import architecture_summary, write_version

    torch.manual_seed(0)
    faces = np.random.default_rng(0).integers(0, 256, (4, 48, 48), dtype=np.uint8)
    spec = InputSpec(mean=0.5, std=0.25)
    for name, options in (("cnn10", {}), ("resnet", {"width": 4, "blocks": [1, 1, 1, 1]})):
        model = models.build(name, **options)
        write_version(
            model, name, root, spec,
            architecture_summary(name, models.config_dict(name, **options)),
            parity_faces=faces, metrics={"note": "untrained test model"},
        )
    return root


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tmp_path_factory.mktemp("model_store"))


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise TimeoutError("service did not become ready")


@contextmanager
def running_app(store: Path, **overrides: object) -> Iterator[TestClient]:
    settings = Settings(model_store=store, reload_interval_s=0, **overrides)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def client(model_store: Path) -> Iterator[TestClient]:
    with running_app(model_store) as c:
        yield c


@contextmanager
def live_server(store: Path, **overrides: object) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 in a background thread; yields its base URL."""
    with live_app(store, **overrides) as (url, _):
        yield url


@contextmanager
def live_app(store: Path, **overrides: object) -> Iterator[tuple[str, FastAPI]]:
    """As `live_server`, and the app too (its `state.runtime` is the server's)."""
    import threading
    import urllib.request

    import uvicorn

    settings = Settings(model_store=store, reload_interval_s=0, **overrides)
    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("live server did not become ready")
            time.sleep(0.05)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_until(condition, timeout: float = 15.0) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
