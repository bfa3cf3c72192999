"""Every Prometheus metric of the service, in one place.

Names carry their unit and `_total`; labels are few and bounded (endpoint templates,
status codes, model names and versions). With `PROMETHEUS_MULTIPROC_DIR` set (several
uvicorn workers), `/metrics` aggregates all workers through the multiprocess collector.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "fer_requests_total", "HTTP requests answered.", ["endpoint", "method", "status"],
    registry=REGISTRY,
)
REQUEST_LATENCY = Histogram(
    "fer_request_latency_seconds", "HTTP request latency, first byte in to response sent.",
    ["endpoint"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
IMAGES = Counter(
    "fer_images_total", "Images (requests and stream frames) that reached face detection.",
    registry=REGISTRY,
)
FACES = Counter(
    "fer_faces_detected_total", "Faces found (or given, with detect=false) and classified.",
    registry=REGISTRY,
)
STAGE_LATENCY = Histogram(
    "fer_stage_latency_seconds", "Time per pipeline stage.", ["stage"],
    buckets=FAST_BUCKETS, registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "fer_batch_size", "Faces per inference batch.", ["model", "version"],
    buckets=BATCH_BUCKETS, registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "fer_queue_wait_seconds",
    "Time a face waited in the batcher before its batch ran, or before it was refused for "
    "waiting longer than the queue timeout.",
    ["model", "version"], buckets=FAST_BUCKETS, registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "fer_queue_depth", "Faces waiting in the batcher.", ["model", "version"],
    registry=REGISTRY, multiprocess_mode="livesum",
)
INFERENCE_LATENCY = Histogram(
    "fer_inference_latency_seconds", "ONNX Runtime time per batch.", ["model", "version"],
    buckets=FAST_BUCKETS, registry=REGISTRY,
)
# With several workers, the fewest any live worker has: a worker that loaded nothing shows.
MODELS_LOADED = Gauge(
    "fer_models_loaded", "Model versions loaded and serving.", registry=REGISTRY,
    multiprocess_mode="livemin",
)
MODEL_LOAD_FAILURES = Gauge(
    "fer_model_load_failures", "Model versions present but refused at load.",
    registry=REGISTRY, multiprocess_mode="max",
)
REJECTED = Counter(
    "fer_rejected_total", "Requests refused before inference, by reason.", ["reason"],
    registry=REGISTRY,
)
STREAMS_OPEN = Gauge(
    "fer_streams_open", "Open WebSocket streams.", registry=REGISTRY,
    multiprocess_mode="livesum",
)
STREAM_FRAMES = Counter(
    "fer_stream_frames_total", "WebSocket frames by outcome.", ["outcome"], registry=REGISTRY,
)
FRAME_LATENCY = Histogram(
    "fer_frame_latency_seconds", "WebSocket frame latency, received to answered.",
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)


PER_VERSION = (BATCH_SIZE, QUEUE_WAIT, QUEUE_DEPTH, INFERENCE_LATENCY)


def forget_version(model: str, version: int) -> None:
    """Drop the series of a version no longer loaded, so that dashboards stop showing it.

    Not possible in multiprocess mode (the values live in the workers' files); there the
    retired version's queue depth has been set to 0 and its other series stop growing."""
    if multiprocess_mode():
        return
    for metric in PER_VERSION:
        metric.remove(model, str(version))


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def exposition() -> tuple[bytes, str]:
    """The text a scrape gets, and its content type."""
    if multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
