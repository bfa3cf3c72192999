"""WebSocket /v1/stream: real frames, latest-frame-wins, errors, limits, commands, cleanup."""

from __future__ import annotations

import asyncio
import gc
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from service import metrics
from service.app import create_app
from service.card import CLASSES
from service.settings import Settings
from service.streaming import Stream, registry
from tests.conftest import live_server, photo, running_app, wait_until
from tests.media import jpeg, read_video, write_video
from tests.service.stream_helpers import replies_in_lockstep
from tests.service.test_batcher import gated
from tests.service.test_model_store import copy_version


@pytest.fixture(scope="module")
def client(model_store: Path) -> Iterator[TestClient]:
    with running_app(model_store) as c:
        yield c


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """The frames of a short MP4 made from the test photos, JPEG-encoded as a client sends them."""
    path = tmp_path_factory.mktemp("video") / "faces.mp4"
    count = write_video(path, repeat=2)
    decoded = read_video(path)
    assert len(decoded) == count
    return [jpeg(frame) for frame in decoded]


def small_png() -> bytes:
    ok, data = cv2.imencode(".png", np.full((48, 48), 128, np.uint8))
    assert ok
    return data.tobytes()



def counter(outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("fer_stream_frames_total", {"outcome": outcome}) or 0.0


def streams_open() -> float:
    return metrics.REGISTRY.get_sample_value("fer_streams_open") or 0.0


def stream_tasks(client: TestClient) -> list[str]:
    async def names() -> list[str]:
        return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("stream-")]

    assert client.portal is not None
    return client.portal.call(names)


# -- answers ----------------------------------------------------------------------------
def test_real_frames_are_answered_in_order_with_faces(
    client: TestClient, frames: list[bytes]
) -> None:
    with client.websocket_connect("/v1/stream?model=cnn10") as ws:
        replies = replies_in_lockstep(ws, frames)
    with_faces = [r for r in replies if r["faces"]]
    assert len(with_faces) >= len(frames) // 2
    reply = with_faces[0]
    assert (reply["model"], reply["version"]) == ("cnn10", 1)
    assert reply["image"] == {"width": 350, "height": 350}
    assert {"latency_ms", "wait_ms", "inference_ms", "total_ms"} <= set(reply["timings"])
    face = reply["faces"][0]
    assert face["label"] in CLASSES
    assert set(face["probabilities"]) == set(CLASSES) == set(face["smoothed"])
    assert sum(face["smoothed"].values()) == pytest.approx(1, abs=1e-3)
    assert isinstance(face["track_id"], int)


def test_a_still_face_keeps_its_track_id(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?model=cnn10") as ws:
        ids = []
        for _ in range(3):
            ws.send_bytes(photo())
            ids.append([face["track_id"] for face in ws.receive_json()["faces"]])
    assert ids[0] and ids[0] == ids[1] == ids[2]


def test_detect_false_treats_the_frame_as_one_face(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?model=cnn10&detect=false") as ws:
        ws.send_bytes(small_png())
        reply = ws.receive_json()
    assert [f["box"] for f in reply["faces"]] == [{"x": 0, "y": 0, "width": 48, "height": 48}]


def open_stream(client: TestClient) -> Stream:
    """The server side of the one stream open in `client`'s app."""
    streams = registry(client.app)
    assert wait_until(lambda: len(streams.live) == 1, timeout=60)
    (stream,) = streams.live
    return stream


def test_a_burst_drops_frames_and_answers_the_last(client: TestClient, frames: list[bytes]) -> None:
    burst = (frames * 3)[:30]
    dropped_before = counter("dropped")
    model = client.app.state.runtime.store.get("cnn10")
    with gated(model) as gate, client.websocket_connect("/v1/stream?model=cnn10") as ws:
        ws.send_bytes(burst[0])
        gate_started = gate.started(1)
        client.portal.call(lambda: gate_started)  # frame 0 is held on the model
        stream = open_stream(client)
        for frame in burst[1:]:
            ws.send_bytes(frame)
        assert wait_until(lambda: stream.received == len(burst), timeout=60)
        gate.gate.set()  # frames 1..28 were each replaced by the next one: dropped
        replies = [ws.receive_json(), ws.receive_json()]
    # The drops are counted in the next reply sent: frame 0's. The newest frame is answered.
    assert [(r["frame"], r["dropped"]) for r in replies] == [(0, 28), (29, 0)]
    assert all("error" not in r for r in replies)
    assert counter("dropped") - dropped_before == 28


def test_a_bad_frame_gets_an_error_and_the_stream_goes_on(client: TestClient) -> None:
    errors_before = counter("error")
    with client.websocket_connect("/v1/stream?model=cnn10") as ws:
        ws.send_bytes(photo())
        assert "error" not in ws.receive_json()
        ws.send_bytes(b"this is not an image")
        assert ws.receive_json() == {
            "frame": 1, "dropped": 0, "error": "unsupported_media_type",
            "detail": "not a supported image: expected one of jpeg, png, webp, bmp",
        }
        ws.send_bytes(photo()[:2000])  # truncated JPEG
        reply = ws.receive_json()
        assert (reply["frame"], reply["error"]) == (2, "corrupt_image")
        ws.send_bytes(b"")
        assert ws.receive_json()["error"] == "empty_body"
        ws.send_bytes(photo())
        reply = ws.receive_json()
        assert reply["frame"] == 4 and reply["faces"]
    assert counter("error") - errors_before == 3


# -- commands ---------------------------------------------------------------------------
def test_set_model_switches_the_model(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?model=cnn10") as ws:
        ws.send_bytes(photo())
        assert ws.receive_json()["model"] == "cnn10"
        ws.send_json({"command": "set_model", "model": "resnet", "version": None})
        assert ws.receive_json() == {"command": "set_model", "model": "resnet", "version": 1}
        ws.send_bytes(photo())
        reply = ws.receive_json()
        assert (reply["model"], reply["version"]) == ("resnet", 1)
        ws.send_json({"command": "set_model", "model": "nope"})
        reply = ws.receive_json()
        assert (reply["command"], reply["error"]) == ("set_model", "unknown_model")
        ws.send_json({"command": "set_model", "model": "resnet", "version": 7})
        assert ws.receive_json()["error"] == "unknown_version"
        ws.send_bytes(photo())
        assert ws.receive_json()["model"] == "resnet"  # a refused switch changes nothing


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ('{"command": "dance"}', "unknown_command"),
        ("{not json", "bad_command"),
        ("[1, 2]", "bad_command"),
        ('{"command": 5}', "bad_command"),
        ('{"command": "set_model", "version": "x"}', "bad_command"),
        ('{"command": "set_model", "version": "\u00b2"}', "bad_command"),  # "²".isdigit()
        ('{"command": "set_model", "version": "\u0661"}', "bad_command"),  # Arabic-Indic 1
        ('{"command": "set_model", "version": true}', "bad_command"),
        ('{"command": "set_model", "version": 0}', "bad_command"),
        ('{"command": "set_model", "model": 5}', "bad_command"),
        ('{"command": "set_detect", "detect": "maybe"}', "bad_command"),
    ],
)
def test_bad_commands_get_an_error_reply(client: TestClient, message: str, error: str) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(message)
        assert ws.receive_json()["error"] == error
        ws.send_json({"command": "ping"})  # still open
        assert ws.receive_json()["pong"] is True


def test_set_detect_and_ping(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?model=cnn10") as ws:
        ws.send_json({"command": "set_detect", "detect": False})
        assert ws.receive_json() == {"command": "set_detect", "detect": False}
        ws.send_bytes(small_png())
        assert len(ws.receive_json()["faces"]) == 1


# -- connect-time refusals --------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("model=nope", "unknown_model"),
        ("model=cnn10&version=9", "unknown_version"),
        ("version=abc", "invalid_request"),
        ("version=%C2%B2", "invalid_request"),  # "²": closed the stream with 1011
        ("version=0", "invalid_request"),
        ("model=" + "x" * 100, "invalid_request"),
        ("detect=maybe", "invalid_request"),
    ],
)
def test_bad_query_is_refused_with_1008(client: TestClient, query: str, error: str) -> None:
    with client.websocket_connect(f"/v1/stream?{query}") as ws:
        refusal = ws.receive_json()
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1008 and closed.value.reason
    # The same check, code and detail as /predict's.
    answer = client.post(f"/predict?{query}", content=photo()).json()
    assert refusal == answer and refusal["error"] == error


def test_a_model_that_did_not_load_is_try_again_later(tmp_path: Path, model_store: Path) -> None:
    folder = tmp_path / "cnn10" / "1"
    shutil.copytree(model_store / "cnn10" / "1", folder)
    (folder / "model.onnx").write_bytes(b"not a graph")
    with TestClient(create_app(Settings(model_store=tmp_path, reload_interval_s=0,
                                        default_model="cnn10", ensemble=""))) as client:
        assert wait_until(lambda: client.app.state.runtime.ready)
        for query, code, error in (("", 1013, "not_ready"), ("?model=cnn10", 1013, "not_ready"),
                                   ("?model=vgg", 1008, "unknown_model")):
            with client.websocket_connect(f"/v1/stream{query}") as ws:
                refusal = ws.receive_json()
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
            assert (closed.value.code, refusal["error"]) == (code, error), query
            assert ("retry_after_s" in refusal) == (code == 1013)


# -- limits -----------------------------------------------------------------------------
def test_too_large_messages_get_an_error(model_store: Path) -> None:
    with running_app(model_store, stream_max_message_bytes=4096) as client:
        with client.websocket_connect("/v1/stream?model=cnn10&detect=false") as ws:
            big = photo()
            assert len(big) > 4096
            ws.send_bytes(big)
            reply = ws.receive_json()
            assert (reply["frame"], reply["error"]) == (0, "frame_too_large")
            ws.send_text('{"command": "ping", "pad": "' + "x" * 5000 + '"}')
            assert ws.receive_json()["error"] == "bad_command"
            ws.send_bytes(small_png())
            reply = ws.receive_json()
            assert reply["frame"] == 1 and "error" not in reply


def test_streams_over_the_limit_are_refused_with_1013(model_store: Path) -> None:
    with running_app(model_store, stream_max_streams=1) as client:
        with client.websocket_connect("/v1/stream") as first:
            first.send_json({"command": "ping"})
            assert first.receive_json()["pong"]
            with client.websocket_connect("/v1/stream") as second:
                assert second.receive_json()["error"] == "too_many_streams"
                with pytest.raises(WebSocketDisconnect) as closed:
                    second.receive_json()
                assert closed.value.code == 1013
        assert wait_until(lambda: registry(client.app).open == 0)
        with client.websocket_connect("/v1/stream") as again:  # the slot is free again
            again.send_json({"command": "ping"})
            assert again.receive_json()["pong"]


def test_an_idle_stream_is_closed(model_store: Path) -> None:
    with running_app(model_store, stream_idle_timeout_s=0.3) as client:
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_json({"command": "ping"})
            ws.receive_json()
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
    assert closed.value.code == 1000 and "idle" in closed.value.reason


# -- a version retired mid-stream -------------------------------------------------------
def test_a_version_removed_mid_frame_answers_it_and_the_stream_goes_on(
    tmp_path: Path, model_store: Path
) -> None:
    """Defect: the frame on the retired version's batch was never answered, and the
    stream, its later frames resetting the idle timer, never ended."""
    for version in (1, 2):
        copy_version(model_store / "cnn10" / "1", tmp_path, "cnn10", version)
    with running_app(tmp_path, ensemble="", default_model="cnn10") as client:
        runtime = client.app.state.runtime
        with gated(runtime.store.get("cnn10", 2)) as gate, \
                client.websocket_connect("/v1/stream?model=cnn10") as ws, \
                ThreadPoolExecutor(1) as pool:
            ws.send_bytes(photo())  # frame 0, on version 2 (the latest)
            started = gate.started(1)
            client.portal.call(lambda: started)
            ws.send_bytes(photo())  # frame 1 waits for the processor
            stream = open_stream(client)
            assert wait_until(lambda: stream.received == 2)

            shutil.rmtree(tmp_path / "cnn10" / "2")
            syncing = pool.submit(client.portal.call, runtime.sync_models)
            assert wait_until(lambda: ("cnn10", 2) not in runtime.batchers._batchers)
            gate.gate.set()  # the retiring version finishes the batch it was running
            first, second = ws.receive_json(), ws.receive_json()
            syncing.result()
        assert (first["frame"], first["version"]) == (0, 2) and first["faces"]
        assert (second["frame"], second["version"]) == (1, 1) and second["faces"]
        assert runtime.batchers.queued_faces == 0
        assert metrics.REGISTRY.get_sample_value(
            "fer_queue_depth", {"model": "cnn10", "version": "2"}) is None


# -- cleanup and metrics ----------------------------------------------------------------
def test_a_client_leaving_mid_stream_leaves_nothing_behind(
    client: TestClient, frames: list[bytes]
) -> None:
    streams = registry(client.app)
    assert wait_until(lambda: streams.open == 0 and not stream_tasks(client))
    gauge = streams_open()
    for _ in range(3):
        with client.websocket_connect("/v1/stream") as ws:
            for frame in frames[:10]:
                ws.send_bytes(frame)  # and leave without reading a reply
            assert wait_until(lambda: len(stream_tasks(client)) == 2)
            assert streams_open() == gauge + 1
    assert wait_until(lambda: not stream_tasks(client)), stream_tasks(client)
    assert wait_until(lambda: streams.open == 0 and streams_open() == gauge)

    def nothing_referenced() -> bool:
        gc.collect()
        return len(streams.live) == 0

    # No Stream (nor its frames) is still referenced once the work in flight has finished
    # (on a loaded machine an executor thread can still hold the last batch for a moment).
    assert wait_until(nothing_referenced), list(streams.live)


def drive_stream(client: TestClient, frames: list[bytes], then: BaseException) -> list[dict]:
    """Run /v1/stream straight through the ASGI app: connect, `frames`, then `then` raised
    by the next read. Returns what the app sent."""
    scope = {
        "type": "websocket", "asgi": {"version": "3.0"}, "path": "/v1/stream",
        "raw_path": b"/v1/stream", "root_path": "", "query_string": b"model=cnn10",
        "headers": [], "scheme": "ws", "server": ("testserver", 80),
        "client": ("testclient", 50000), "subprotocols": [],
    }
    incoming = [{"type": "websocket.connect"}]
    incoming += [{"type": "websocket.receive", "bytes": f} for f in frames]
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        raise then

    async def send(message: dict) -> None:
        sent.append(message)

    async def run() -> None:
        await client.app(scope, receive, send)

    assert client.portal is not None
    client.portal.call(run)
    return sent


def test_a_torn_down_connection_is_a_client_leaving(
    client: TestClient, frames: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """A read after the server side closed (anyio's ClosedResourceError, as when the handler
    is cancelled with frames still queued) ends the stream quietly, not as a server error."""
    streams = registry(client.app)
    assert wait_until(lambda: streams.open == 0 and not stream_tasks(client))
    with caplog.at_level("ERROR", logger="service.streaming"):
        sent = drive_stream(client, frames[:3], anyio.ClosedResourceError())
    assert [m for m in sent if m["type"] == "websocket.close"] == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert wait_until(lambda: streams.open == 0 and not stream_tasks(client))


def test_an_unexpected_read_failure_is_logged_once_and_closes_1011(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("ERROR", logger="service.streaming"):
        sent = drive_stream(client, [], ValueError("the transport broke"))
    closes = [m for m in sent if m["type"] == "websocket.close"]
    assert [m["code"] for m in closes] == [1011]
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1 and "receiver" in failures[0].getMessage()
    assert isinstance(failures[0].exc_info[1], ValueError)
    caplog.clear()  # drop the record's traceback (it holds the Stream) before the next test


def test_a_real_client_vanishing_mid_stream_is_cleaned_up(
    model_store: Path, frames: list[bytes]
) -> None:
    """Over a real socket (uvicorn), dropped without a close handshake mid-burst."""
    from websockets.sync.client import connect

    with live_server(model_store, stream_max_streams=1) as url:
        stream_url = url.replace("http://", "ws://") + "/v1/stream?model=cnn10"
        gauge = streams_open()
        ws = connect(stream_url)
        for frame in frames:
            ws.send(frame)
        assert wait_until(lambda: streams_open() == gauge + 1)
        ws.socket.close()  # vanish: no close frame
        assert wait_until(lambda: streams_open() == gauge)
        with connect(stream_url) as again:  # the only slot was freed
            again.send(frames[0])
            assert '"frame":0' in again.recv(timeout=30)


def test_frame_metrics(client: TestClient) -> None:
    answered = counter("answered")
    latency = metrics.REGISTRY.get_sample_value("fer_frame_latency_seconds_count") or 0
    with client.websocket_connect("/v1/stream?model=cnn10") as ws:
        ws.send_bytes(photo())
        ws.receive_json()
    assert counter("answered") == answered + 1
    assert metrics.REGISTRY.get_sample_value("fer_frame_latency_seconds_count") == latency + 1


def test_the_demo_page_is_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text and "/static/style.css" in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "/v1/stream" in script.text
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/nope.js").status_code == 404
