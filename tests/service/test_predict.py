from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from service.card import CLASSES
from tests.conftest import all_photos, live_server, photo, running_app
from tests.service.test_imaging import png_header_claiming


def check_face(face: dict) -> None:
    assert set(face) == {"box", "label", "score", "probabilities"}
    probabilities = face["probabilities"]
    assert list(probabilities) == list(CLASSES)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert face["label"] == max(probabilities, key=probabilities.get)
    assert face["score"] == probabilities[face["label"]]


def test_multipart_upload_of_a_real_photo_finds_its_face(client):
    response = client.post("/predict", files={"image": ("face.jpg", photo(), "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "ensemble" and body["version"] == 1
    assert [m["name"] for m in body["members"]] == ["cnn10", "resnet"]
    assert body["image"] == {"width": 350, "height": 350}
    (face,) = body["faces"]
    check_face(face)
    box = face["box"]
    assert 0 <= box["x"] < 100 and 0 <= box["y"] < 100 and box["width"] > 200
    assert set(body["timings"]) == {"decode_ms", "detect_ms", "preprocess_ms", "inference_ms", "total_ms"}
    assert response.headers["x-request-id"]


def test_raw_body_gives_the_same_answer_as_multipart(client):
    raw = client.post("/predict?model=cnn10", content=photo(), headers={"content-type": "image/jpeg"})
    form = client.post("/predict?model=cnn10", files={"image": ("f.jpg", photo(), "image/jpeg")})
    assert raw.status_code == form.status_code == 200
    assert raw.json()["faces"] == form.json()["faces"]


@pytest.mark.parametrize("fmt", ["png", "webp", "bmp"])
def test_other_formats_are_accepted(client, fmt):
    image = cv2.imdecode(np.frombuffer(photo(), np.uint8), cv2.IMREAD_COLOR)
    data = cv2.imencode(f".{fmt}", image)[1].tobytes()
    response = client.post("/predict", content=data, headers={"content-type": f"image/{fmt}"})
    assert response.status_code == 200 and len(response.json()["faces"]) == 1


def test_every_fixture_photo_is_answered(client):
    for path in all_photos():
        response = client.post("/predict", content=path.read_bytes())
        assert response.status_code == 200
        for face in response.json()["faces"]:
            check_face(face)


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
    for query, model, version in [("model=cnn10", "cnn10", 1), ("model=resnet&version=1", "resnet", 1),
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
    with running_app(model_store, max_delay_ms=30) as client:
        expected = client.post("/predict?model=cnn10", content=photo()).json()["faces"]
        before = client.get("/metrics").text
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(
                lambda _: client.post("/predict?model=cnn10", content=photo()).json(), range(16)))
        for answer in answers:
            for got, want in zip(answer["faces"], expected, strict=True):
                assert got["box"] == want["box"]
                for name in CLASSES:
                    assert got["probabilities"][name] == pytest.approx(want["probabilities"][name], abs=1e-5)
        after = client.get("/metrics").text
        series = '{model="cnn10",version="1"}'
        batches = sum_metric(after, "fer_batch_size_count" + series) - sum_metric(before, "fer_batch_size_count" + series)
        faces = sum_metric(after, "fer_batch_size_sum" + series) - sum_metric(before, "fer_batch_size_sum" + series)
        assert faces == 16 and batches < 16  # 16 faces ran in fewer batches than requests


def sum_metric(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


BAD_REQUESTS = [
    ("empty body", {"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty_body"),
    ("not an image", {"content": b"%PDF-1.4 hello", "headers": {"content-type": "image/jpeg"}},
     415, "unsupported_media_type"),
    ("truncated jpeg", {"content": photo()[:3000]}, 400, "corrupt_image"),
    ("corrupt jpeg", {"content": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8}, 400, "corrupt_image"),
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


@pytest.mark.parametrize("name,request_args,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_json_4xx_and_the_next_request_is_served(client, name, request_args, status, code):
    response = client.post("/predict", **request_args)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["detail"] and (code is None or body["error"] == code)
    assert client.post("/predict", content=photo()).status_code == 200


@pytest.mark.parametrize("query,status,code", [
    ("model=vgg", 404, "unknown_model"),
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
    face48 = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (48, 48), np.uint8))[1].tobytes()
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
