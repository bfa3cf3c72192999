"""service/metrics.py: what the series mean across workers and across model versions."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from service import metrics
from tests.conftest import ROOT

WORKER = "import sys; from service import metrics; metrics.MODELS_LOADED.set(int(sys.argv[1]))"


def workers_reporting(folder: Path, loaded: list[int]) -> float | None:
    """fer_models_loaded as /metrics aggregates it over workers that each loaded `loaded`."""
    for count in loaded:  # one process per worker, as uvicorn --workers runs them
        subprocess.run([sys.executable, "-c", WORKER, str(count)], cwd=ROOT, check=True,
                       env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}, timeout=60)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    return registry.get_sample_value("fer_models_loaded")


@pytest.mark.parametrize(("loaded", "shown"), [([4, 4], 4), ([4, 0], 0), ([0, 4], 0)])
def test_a_worker_with_no_models_shows_across_workers(tmp_path: Path, loaded, shown) -> None:
    """The alert FerNoModelsLoaded fires on 0: one worker serving nothing must show."""
    assert workers_reporting(tmp_path, loaded) == shown


def series(name: str, version: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, {"model": "retired-test", "version": version})


def test_forgetting_a_version_drops_its_series_and_only_its() -> None:
    for version in ("1", "2"):
        metrics.QUEUE_DEPTH.labels(model="retired-test", version=version).set(3)
        metrics.QUEUE_WAIT.labels(model="retired-test", version=version).observe(0.1)
        metrics.BATCH_SIZE.labels(model="retired-test", version=version).observe(2)
        metrics.INFERENCE_LATENCY.labels(model="retired-test", version=version).observe(0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.forget_version("retired-test", 1)
        metrics.forget_version("retired-test", 1)  # twice, or never used: nothing to do
    for name in ("fer_queue_depth", "fer_queue_wait_seconds_count", "fer_batch_size_count",
                 "fer_inference_latency_seconds_count"):
        assert series(name, "1") is None, name
        assert series(name, "2") is not None, name
    metrics.forget_version("retired-test", 2)
