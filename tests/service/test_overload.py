"""Load shedding and client faults against a real server (uvicorn on a socket).

A burst far over the limits gets only answers (200, or 503/429 with Retry-After), never
a connection error or another 5xx, and leaves nothing behind; so do clients that leave
mid-upload or before reading their answer.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from bench.server import free_port
from service import metrics
from tests.conftest import ROOT, live_app, photo, wait_until
from tests.service.test_batcher import gated
from tests.service.test_model_store import copy_version

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
                  queue_timeout_ms=600_000, api_keys="burst,probe",
                  rate_limit_per_minute=RATE) as (url, app):
        runtime = app.state.runtime
        runtime.guard.limiter.clock = lambda: 0.0  # no refill during the burst, however long
        server_errors = requests_answered(500)
        refused_before = requests_answered(503) + requests_answered(429)
        with gated(runtime.store.get("cnn10")) as gate, ThreadPoolExecutor(1) as pool:
            # Held on the model: at most one batch and a full queue; the rest is shed.
            bursting = pool.submit(asyncio.run, burst(url, BURST, {"X-API-Key": "burst"}))

            def held() -> int:
                return sum(gate.batches[:1]) + runtime.batchers.queued_faces

            def only_held_ones_left() -> bool:
                refused = requests_answered(503) + requests_answered(429) - refused_before
                return runtime.pipeline.inflight == 0 and refused + held() == BURST

            assert wait_until(only_held_ones_left, timeout=120)
            waiting = held()
            gate.gate.set()
            responses, errors = bursting.result()
        assert not errors, errors[:3]  # every request got an answer
        statuses = Counter(r.status_code for r in responses)
        assert set(statuses) <= {200, 429, 503}, statuses
        # The bucket let through its capacity exactly; of those, the held faces were answered.
        assert statuses[429] == BURST - RATE and statuses[200] + statuses[503] == RATE, statuses
        assert statuses[200] == waiting and 1 <= waiting <= 16, (statuses, waiting)
        for response in responses:
            if response.status_code != 200:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["error"] in ("overloaded", "rate_limited")
        assert requests_answered(500) == server_errors

        assert wait_until(lambda: idle(app))
        probe = httpx.post(url + "/predict?model=cnn10", content=photo(),
                           headers={"X-API-Key": "probe"}, timeout=60)
        assert probe.status_code == 200 and len(probe.json()["faces"]) == 1
        assert httpx.get(url + "/readyz").status_code == 200
        assert idle(app)


def raw_request(port: int, body: bytes, declared: int) -> bytes:
    return (f"POST /predict?model=cnn10 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: image/jpeg\r\nContent-Length: {declared}\r\n\r\n").encode() + body


def images_decoded() -> float:
    return metrics.REGISTRY.get_sample_value("fer_images_total") or 0.0


def test_clients_leaving_mid_request_leave_nothing_behind(model_store: Path) -> None:
    with live_app(model_store) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        data = photo()
        server_errors = requests_answered(500)

        # Half the body, then gone: the upload is abandoned (499), nothing is logged as a 500.
        abandoned = requests_answered(499)
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(raw_request(port, data[: len(data) // 2], len(data)))
        assert wait_until(lambda: requests_answered(499) == abandoned + 5)

        # The whole body, then gone (closed, or reset) while the face is held in the
        # batcher: the work finishes and its answer goes nowhere.
        answered = requests_answered(200)
        with gated(app.state.runtime.store.get("cnn10")) as gate:
            for reset in (False, False, False, True, True):
                decoded = images_decoded()
                sock = socket.create_connection(("127.0.0.1", port))
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.sendall(raw_request(port, data, len(data)))
                assert wait_until(lambda: images_decoded() > decoded)  # noqa: B023 (in the batcher now)
                sock.close()
            assert requests_answered(200) == answered  # all five are still held
            gate.gate.set()
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
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            started = time.monotonic()
            sock.sendall(raw_request(port, data[:100], len(data)))  # and nothing more
            reply = sock.recv(4096)
            waited = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        # Not before the limit (a slower machine only answers later).
        assert b"upload_timeout" in reply and waited >= 0.45
        assert wait_until(lambda: idle(app))
        assert httpx.post(url + "/predict?model=cnn10", content=data, timeout=30).status_code == 200


# A real server process whose inference waits while the file $FER_TEST_HOLD exists, and
# says so by creating $FER_TEST_HOLD.started: the test knows a batch is on the inference
# thread, however slow the machine.
GATED_SERVER = """
import os, sys, time
import uvicorn
from service.onnx_model import OnnxModel

hold = os.environ["FER_TEST_HOLD"]
infer = OnnxModel.infer

def gated(self, batch):
    if os.path.exists(hold):
        open(hold + ".started", "w").close()
        while os.path.exists(hold):
            time.sleep(0.01)
    return infer(self, batch)

OnnxModel.infer = gated
uvicorn.run("service.app:app", host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def metric_value(url: str, series: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series))


@pytest.mark.slow
def test_a_version_removed_mid_request_ends_every_request_and_sigterm_completes(
    model_store: Path, tmp_path: Path
) -> None:
    """Defect: removing a version stranded the batch it was running and the requests
    behind it (unanswered for ever), and the server then ignored SIGTERM."""
    store = tmp_path / "store"
    for version in (1, 2):
        copy_version(model_store / "cnn10" / "1", store, "cnn10", version)
    hold = tmp_path / "hold"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FER_MODEL_STORE": str(store), "FER_RELOAD_INTERVAL_S": "0.1",
           "FER_MAX_BATCH_SIZE": "1", "FER_MAX_DELAY_MS": "0", "FER_ENSEMBLE": "",
           "FER_DEFAULT_MODEL": "cnn10", "FER_QUEUE_TIMEOUT_MS": "600000",
           "FER_TEST_HOLD": str(hold)}
    server = subprocess.Popen([sys.executable, "-c", GATED_SERVER, str(port)], cwd=ROOT, env=env)
    try:
        assert wait_until(lambda: server.poll() is None and _ready(url), timeout=90)
        hold.touch()
        series = 'fer_queue_depth{model="cnn10",version="2"}'
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(httpx.post, url + "/predict?model=cnn10&version=2",
                                content=photo(), timeout=120)
            assert wait_until(lambda: Path(f"{hold}.started").exists(), timeout=60)
            behind = [pool.submit(httpx.post, url + "/predict?model=cnn10&version=2",
                                  content=photo(), timeout=120) for _ in range(2)]
            assert wait_until(lambda: metric_value(url, series) == 2, timeout=60)

            shutil.rmtree(store / "cnn10" / "2")  # picked up by the next poll
            for request in behind:  # answered while the first batch is still held
                response = request.result()
                assert response.status_code == 503, response.text
                assert response.json()["error"] == "model_unloaded"
                assert int(response.headers["retry-after"]) >= 1
            hold.unlink()
            response = first.result()
            assert response.status_code == 200 and response.json()["version"] == 2

        assert metric_value(url, series) == 0  # no series left for the retired version
        answer = httpx.post(url + "/predict?model=cnn10&version=2", content=photo(), timeout=60)
        assert (answer.status_code, answer.json()["error"]) == (404, "unknown_version")
        assert httpx.post(url + "/predict", content=photo(), timeout=60).json()["version"] == 1

        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal; a hang is the defect.
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        hold.unlink(missing_ok=True)
        if server.poll() is None:
            server.kill()
            server.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
