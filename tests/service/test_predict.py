import asyncio
import json
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import metrics
from service.app import create_app
from service.card import CLASSES
from service.settings import Settings
from tests.conftest import all_photos, live_server, photo, running_app, wait_until
from tests.service.test_batcher import gated
from tests.service.test_imaging import png_header_claiming


def check_face(face: dict) -> None:
    assert set(face) == {"box", "label", "score", "probabilities"}
    probabilities = face["probabilities"]
    assert list(probabilities) == list(CLASSES)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert face["label"] == max(probabilities, key=probabilities.get)
    assert face["score"] == probabilities[face["label"]]


def test_multipart_upload_of_a_real_photo_finds_its_face(client):
    response = client.post("/predict?model=ensemble",
                           files={"image": ("face.jpg", photo(), "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "ensemble" and body["version"] == 1
    assert [m["name"] for m in body["members"]] == ["cnn10", "resnet"]
    assert body["image"] == {"width": 350, "height": 350}
    (face,) = body["faces"]
    check_face(face)
    box = face["box"]
    assert 0 <= box["x"] < 100 and 0 <= box["y"] < 100 and box["width"] > 200
    assert set(body["timings"]) == {"decode_ms", "detect_ms", "preprocess_ms", "inference_ms",
                                    "total_ms"}
    assert response.headers["x-request-id"]


def test_raw_body_gives_the_same_answer_as_multipart(client):
    raw = client.post("/predict?model=cnn10", content=photo(),
                      headers={"content-type": "image/jpeg"})
    form = client.post("/predict?model=cnn10", files={"image": ("f.jpg", photo(), "image/jpeg")})
    assert raw.status_code == form.status_code == 200
    assert raw.json()["faces"] == form.json()["faces"]


@pytest.mark.parametrize("fmt", ["png", "webp", "bmp"])
def test_other_formats_are_accepted(client, fmt):
    image = cv2.imdecode(np.frombuffer(photo(), np.uint8), cv2.IMREAD_COLOR)
    data = cv2.imencode(f".{fmt}", image)[1].tobytes()
    response = client.post("/predict", content=data, headers={"content-type": f"image/{fmt}"})
    assert response.status_code == 200 and len(response.json()["faces"]) == 1


def test_every_fixture_photo_is_answered_with_its_face(client):
    photos = all_photos()
    assert len(photos) >= 6
    for path in photos:
        response = client.post("/predict", content=path.read_bytes())
        assert response.status_code == 200
        faces = response.json()["faces"]
        assert faces, f"no face found in {path.name}"  # each is a portrait of one person
        for face in faces:
            check_face(face)
        box = faces[0]["box"]
        assert box["width"] * box["height"] > 0.25 * 350 * 350  # the portrait's face


def test_no_face_is_an_empty_list(client):
    blank = cv2.imencode(".png", np.full((120, 160), 90, np.uint8))[1].tobytes()
    response = client.post("/predict", content=blank, headers={"content-type": "image/png"})
    assert response.status_code == 200 and response.json()["faces"] == []


def test_detect_false_classifies_the_whole_image_as_one_face(client):
    face48 = cv2.imencode(".png", np.full((48, 48), 120, np.uint8))[1].tobytes()
    body = client.post("/predict?detect=false", content=face48).json()
    (face,) = body["faces"]
    assert face["box"] == {"x": 0, "y": 0, "width": 48, "height": 48}
    check_face(face)


def test_model_and_version_selection(client):
    for query, model, version in [("model=cnn10", "cnn10", 1),
                                  ("model=resnet&version=1", "resnet", 1),
                                  ("model=ensemble&version=1", "ensemble", 1)]:
        body = client.post(f"/predict?{query}", content=photo()).json()
        assert (body["model"], body["version"]) == (model, version)


def test_ensemble_is_the_mean_of_its_members(client):
    def probabilities(model: str) -> np.ndarray:
        face = client.post(f"/predict?model={model}", content=photo()).json()["faces"][0]
        return np.array(list(face["probabilities"].values()))

    np.testing.assert_allclose(
        probabilities("ensemble"), (probabilities("cnn10") + probabilities("resnet")) / 2, atol=2e-6
    )


def test_concurrent_requests_are_batched_and_agree_with_sequential_ones(model_store):
    with running_app(model_store) as client:
        expected = client.post("/predict?model=cnn10", content=photo()).json()["faces"]
        before = client.get("/metrics").text
        runtime = client.app.state.runtime
        model = runtime.store.get("cnn10")
        with gated(model) as gate, ThreadPoolExecutor(16) as pool:
            # While the first batch is held on the model, the other requests queue up.
            posts = [pool.submit(client.post, "/predict?model=cnn10", content=photo())
                     for _ in range(16)]
            batcher = runtime.batchers.for_model(model)
            assert wait_until(lambda: gate.batches and
                              gate.batches[0] + batcher.queued_faces == 16, timeout=60)
            gate.gate.set()
            answers = [post.result().json() for post in posts]
        for answer in answers:
            for got, want in zip(answer["faces"], expected, strict=True):
                assert got["box"] == want["box"]
                for name in CLASSES:
                    assert got["probabilities"][name] == pytest.approx(
                        want["probabilities"][name], abs=1e-5)
        after = client.get("/metrics").text
        series = '{model="cnn10",version="1"}'
        batches = (sum_metric(after, "fer_batch_size_count" + series)
                   - sum_metric(before, "fer_batch_size_count" + series))
        faces = (sum_metric(after, "fer_batch_size_sum" + series)
                 - sum_metric(before, "fer_batch_size_sum" + series))
        assert faces == 16 and batches == 2  # the held batch, then all the others at once


def sum_metric(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


BAD_REQUESTS = [
    ("empty body", {"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty_body"),
    ("not an image", {"content": b"%PDF-1.4 hello", "headers": {"content-type": "image/jpeg"}},
     415, "unsupported_media_type"),
    ("truncated jpeg", {"content": photo()[:3000]}, 400, "corrupt_image"),
    ("corrupt jpeg", {"content": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8},
     400, "corrupt_image"),
    ("wrong content type", {"content": photo(), "headers": {"content-type": "application/json"}},
     415, "unsupported_media_type"),
    ("multipart without image", {"files": {"picture": ("f.jpg", photo(), "image/jpeg")}},
     400, "missing_image"),
    ("multipart text field", {"data": {"image": "not a file"}, "files": {"x": ("x", b"x")}},
     400, "missing_image"),
    ("bad multipart", {"content": b"--xx\r\nnonsense", "headers": {
        "content-type": "multipart/form-data; boundary=xx"}}, 400, None),
    ("pixel bomb", {"content": png_header_claiming(30_000, 30_000)}, 413, "too_many_pixels"),
]


@pytest.mark.parametrize("name,request_args,status,code", BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_json_4xx_and_the_next_request_is_served(client, name, request_args,
                                                                  status, code):
    response = client.post("/predict", **request_args)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["detail"] and (code is None or body["error"] == code)
    assert client.post("/predict", content=photo()).status_code == 200


@pytest.mark.parametrize("query,status,code", [
    ("model=vgg", 404, "unknown_model"),
    ("version=²", 422, "invalid_request"),
    ("version=١", 422, "invalid_request"),
    ("model=cnn10&version=7", 404, "unknown_version"),
    ("model=ensemble&version=2", 404, "unknown_version"),
    ("version=abc", 422, "invalid_request"),
    ("version=0", 422, "invalid_request"),
    ("detect=maybe", 422, "invalid_request"),
    ("model=" + "x" * 100, 422, "invalid_request"),
])
def test_bad_query_values_are_named_in_the_error(client, query, status, code):
    response = client.post(f"/predict?{query}", content=photo())
    assert response.status_code == status
    assert response.json()["error"] == code
    assert query.split("=")[0] in response.json()["detail"] or status == 404


def test_upload_over_the_limit_is_refused_from_its_content_length(model_store):
    with running_app(model_store, max_body_bytes=50_000) as client:
        response = client.post("/predict", content=b"\xff\xd8\xff" + bytes(60_000))
        assert response.status_code == 413 and response.json()["error"] == "body_too_large"
        assert client.post("/predict", content=photo()).status_code == 200


def test_streamed_upload_is_cut_off_at_the_limit_without_reading_it_all(model_store):
    """Chunked upload with no Content-Length: the server answers 413 once it crosses the cap."""
    import socket

    with live_server(model_store, max_body_bytes=200_000) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"\xff\xd8\xff" + bytes(64 * 1024)
            sent = 0
            sock.settimeout(0.05)
            reply = b""
            for _ in range(1000):  # 64 MB if the server read it all
                try:
                    sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    sent += len(chunk)
                    reply += sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:  # the server closed the connection after answering
                    break
                if reply:
                    break
            sock.settimeout(5)
            try:
                reply += sock.recv(4096)
            except OSError:
                pass
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"body_too_large" in reply
        assert sent < 10 * 1024 * 1024
        import httpx

        assert httpx.post(url + "/predict", content=photo()).status_code == 200


def test_unknown_route_and_method_are_json(client):
    assert client.get("/nope").json()["error"] == "not_found"
    assert client.get("/predict").status_code == 405


def test_detect_false_feeds_the_image_as_it_is_whatever_the_cards_face_crop(tmp_path, model_store):
    import json
    import shutil

    shutil.copytree(model_store / "cnn10", tmp_path / "cnn10")
    face48 = cv2.imencode(
        ".png", np.random.default_rng(0).integers(0, 256, (48, 48), np.uint8))[1].tobytes()
    with running_app(tmp_path, default_model="cnn10") as client:
        plain = client.post("/predict?detect=false", content=face48).json()["faces"]
        photo_plain = client.post("/predict", content=photo()).json()["faces"]
    card_path = tmp_path / "cnn10" / "1" / "model.json"
    card = json.loads(card_path.read_text())
    card["face_crop"] = {"padding": 0.3, "equalize": True}
    card_path.write_text(json.dumps(card))
    with running_app(tmp_path, default_model="cnn10") as client:
        assert client.post("/predict?detect=false", content=face48).json()["faces"] == plain
        assert client.post("/predict", content=photo()).json()["faces"] != photo_plain


# -- start-up and failed loads: configured but not loaded is 503, unknown stays 404 ------
def started(app_settings: Settings) -> Iterator[TestClient]:
    client = TestClient(create_app(app_settings))
    with client:
        runtime = client.app.state.runtime
        assert wait_until(lambda: runtime.ready)  # the first scan of the store is done
        yield client


@pytest.fixture
def nothing_loads(tmp_path: Path, model_store: Path) -> Path:
    """A store whose every version fails to load."""
    for name in ("cnn10", "resnet"):
        folder = tmp_path / name / "1"
        shutil.copytree(model_store / name / "1", folder)
        (folder / "model.onnx").write_bytes(b"not a graph")
    return tmp_path


def test_a_configured_model_that_did_not_load_is_503_not_404(nothing_loads):
    for client in started(Settings(model_store=nothing_loads, reload_interval_s=0)):
        assert client.get("/readyz").status_code == 503
        for query in ("", "?model=cnn10", "?model=ensemble", "?model=resnet&version=1"):
            response = client.post(f"/predict{query}", content=photo())
            assert response.status_code == 503, (query, response.text)
            assert response.json()["error"] == "not_ready"
            assert int(response.headers["retry-after"]) >= 1
        response = client.post("/predict?model=vgg", content=photo())
        assert (response.status_code, response.json()["error"]) == (404, "unknown_model")
        assert client.get("/v1/models/cnn10").status_code == 503
        assert client.get("/v1/models/vgg").status_code == 404


def test_during_start_up_a_configured_model_is_503(model_store, monkeypatch):
    from service.runtime import Runtime

    loading = threading.Event()

    async def never_loads(self):  # start-up that has not finished scanning the store
        loading.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(Runtime, "_load_then_poll", never_loads)
    with TestClient(create_app(Settings(model_store=model_store, reload_interval_s=0))) as client:
        assert loading.wait(30)
        response = client.post("/predict?model=cnn10", content=photo())
        assert (response.status_code, response.json()["error"]) == (503, "not_ready")
        assert client.post("/predict", content=photo()).status_code == 503
        assert client.post("/predict?model=vgg", content=photo()).status_code == 404


# -- an unexpected error is traceable --------------------------------------------------
def test_a_500_carries_the_request_id_in_the_answer_and_the_log(model_store, capfd):
    with running_app(model_store, log_format="json") as client:
        async def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        client.app.state.runtime.pipeline.predict = broken
        response = client.post("/predict", content=photo(), headers={"x-request-id": "trace-500"})
        assert response.status_code == 500
        assert response.json() == {"error": "internal_error",
                                   "detail": "internal error; see the server log"}
        assert response.headers["x-request-id"] == "trace-500"
        del client.app.state.runtime.pipeline.predict
        assert client.post("/predict", content=photo()).status_code == 200  # still serving
    entries = [json.loads(line) for line in capfd.readouterr().err.splitlines()
               if line.startswith("{")]
    (error,) = [e for e in entries if e["level"] == "ERROR"]
    assert error["request_id"] == "trace-500" and "RuntimeError: a bug" in error["exception"]
    access = [e for e in entries if e.get("status") == 500]
    assert [e["request_id"] for e in access] == ["trace-500"]


# -- metrics count what happened ------------------------------------------------------
def test_metrics_count_what_happened(client):
    def value(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    ok = {"endpoint": "/predict", "method": "POST", "status": "200"}
    bad = {**ok, "status": "415"}
    member = {"model": "cnn10", "version": "1"}
    before = {
        "ok": value("fer_requests_total", **ok), "bad": value("fer_requests_total", **bad),
        "faces": value("fer_faces_detected_total"), "images": value("fer_images_total"),
        "batches": value("fer_batch_size_count", **member),
        "batched": value("fer_batch_size_sum", **member),
        "waits": value("fer_queue_wait_seconds_count", **member),
        "latency": value("fer_request_latency_seconds_count", endpoint="/predict"),
    }
    faces = sum(len(client.post("/predict", content=path.read_bytes()).json()["faces"])
                for path in all_photos()[:3])
    client.post("/predict", content=b"junk")
    assert value("fer_requests_total", **ok) == before["ok"] + 3
    assert value("fer_requests_total", **bad) == before["bad"] + 1
    assert value("fer_request_latency_seconds_count", endpoint="/predict") == before["latency"] + 4
    assert value("fer_images_total") == before["images"] + 3  # the junk is refused before
    assert value("fer_faces_detected_total") == before["faces"] + faces
    assert value("fer_batch_size_sum", **member) == before["batched"] + faces
    assert before["batches"] < value("fer_batch_size_count", **member) <= before["batches"] + 3
    assert value("fer_queue_wait_seconds_count", **member) == before["waits"] + 3
    assert value("fer_queue_depth", **member) == 0
    assert value("fer_models_loaded") == 2
