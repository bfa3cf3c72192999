"""Load shedding and client faults against a real server (uvicorn on a socket).

A burst far over the limits gets only answers (200, or 503/429 with Retry-After), never
a connection error or another 5xx, and leaves nothing behind; so do clients that leave
mid-upload or before reading their answer.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from service import metrics
from tests.conftest import wait_until, live_app, photo

BURST = 300
RATE = 200  # per minute: the burst's key has 200 tokens, and gets 3.3 more a second


def requests_answered(status: int) -> float:
    labels = {"endpoint": "/predict", "method": "POST", "status": str(status)}
    return metrics.REGISTRY.get_sample_value("fer_requests_total", labels) or 0.0



def idle(app: FastAPI) -> bool:
    runtime = app.state.runtime
    return runtime.pipeline.inflight == 0 and runtime.batchers.queued_faces == 0


async def burst(
    url: str, count: int, headers: dict[str, str]
) -> tuple[list[httpx.Response], list[BaseException]]:
    """`count` uploads at once, each on its own connection."""
    body = photo()
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        posts = [client.post("/predict?model=cnn10", content=body, headers=headers)
                 for _ in range(count)]
        results = await asyncio.gather(*posts, return_exceptions=True)
    responses = [r for r in results if isinstance(r, httpx.Response)]
    errors = [r for r in results if not isinstance(r, httpx.Response)]
    return responses, errors


@pytest.mark.slow
def test_a_burst_is_shed_with_503_and_429_and_the_service_recovers(model_store: Path) -> None:
    with live_app(model_store, max_inflight_requests=4, max_batch_size=8, max_queue_faces=8,
                  queue_timeout_ms=2000, api_keys="burst,probe",
                  rate_limit_per_minute=RATE) as (url, app):
        server_errors = requests_answered(500)
        started = time.monotonic()
        responses, errors = asyncio.run(burst(url, BURST, {"X-API-Key": "burst"}))
        elapsed = time.monotonic() - started
        assert not errors, errors[:3]  # every request got an answer
        assert elapsed < 25  # so the bucket cannot have refilled the 100 tokens the burst lacks
        statuses = Counter(r.status_code for r in responses)
        assert set(statuses) <= {200, 429, 503}, statuses
        assert statuses[200] >= 4 and statuses[503] > 0 and statuses[429] > 0, statuses
        # The bucket let through its capacity and what it refilled during the burst, no more.
        assert statuses[200] + statuses[503] <= RATE + elapsed * RATE / 60 + 1, (statuses, elapsed)
        for response in responses:
            if response.status_code != 200:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["error"] in ("overloaded", "rate_limited")
        assert requests_answered(500) == server_errors

        assert wait_until(lambda: idle(app))
        probe = httpx.post(url + "/predict?model=cnn10", content=photo(),
                           headers={"X-API-Key": "probe"}, timeout=30)
        assert probe.status_code == 200 and len(probe.json()["faces"]) == 1
        assert httpx.get(url + "/readyz").status_code == 200
        assert idle(app)


def raw_request(port: int, body: bytes, declared: int) -> bytes:
    return (f"POST /predict?model=cnn10 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: image/jpeg\r\nContent-Length: {declared}\r\n\r\n").encode() + body


def images_decoded() -> float:
    return metrics.REGISTRY.get_sample_value("fer_images_total") or 0.0


def test_clients_leaving_mid_request_leave_nothing_behind(model_store: Path) -> None:
    # A long batching delay holds each face in the batcher, so a client can leave while
    # its request waits there for the answer.
    with live_app(model_store, max_delay_ms=300) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        data = photo()
        server_errors = requests_answered(500)

        # Half the body, then gone: the upload is abandoned (499), nothing is logged as a 500.
        abandoned = requests_answered(499)
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(raw_request(port, data[: len(data) // 2], len(data)))
        assert wait_until(lambda: requests_answered(499) == abandoned + 5)

        # The whole body, then gone (closed, or reset) while the face waits for inference:
        # the work finishes and its answer goes nowhere.
        answered = requests_answered(200)
        for reset in (False, False, False, True, True):
            decoded = images_decoded()
            sock = socket.create_connection(("127.0.0.1", port))
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(raw_request(port, data, len(data)))
            assert wait_until(lambda: images_decoded() > decoded)  # noqa: B023 (in the batcher now)
            sock.close()
        assert wait_until(lambda: requests_answered(200) == answered + 5)

        assert wait_until(lambda: idle(app))
        assert requests_answered(500) == server_errors
        response = httpx.post(url + "/predict?model=cnn10", content=data, timeout=30)
        assert response.status_code == 200 and len(response.json()["faces"]) == 1
        assert httpx.get(url + "/readyz").status_code == 200


def test_a_client_trickling_its_upload_is_cut_off_with_408(model_store: Path) -> None:
    with live_app(model_store, upload_timeout_s=0.5) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        data = photo()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(raw_request(port, data[:100], len(data)))  # and nothing more
            reply = sock.recv(4096)
            waited = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"upload_timeout" in reply and 0.4 < waited < 5
        assert wait_until(lambda: idle(app))
        assert httpx.post(url + "/predict?model=cnn10", content=data, timeout=30).status_code == 200
