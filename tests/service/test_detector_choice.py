"""FER_DETECTOR: validated at start-up, and /predict answers one schema for both detectors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.detector import FaceDetector, create_detector
from service.retinaface import DetectorLoadError, RetinaFaceDetector
from service.settings import Settings
from tests.conftest import all_photos, photo, running_app
from tests.media import jpeg

DETECTORS = ["haar", "retinaface"]
FACE_KEYS = {"box", "label", "score", "probabilities"}


def inside(point: dict, box: dict) -> bool:
    return (box["x"] <= point["x"] <= box["x"] + box["width"]
            and box["y"] <= point["y"] <= box["y"] + box["height"])


def test_an_unknown_detector_is_refused_by_the_settings():
    with pytest.raises(ValidationError, match="haar"):
        Settings(detector="dlib")


def test_create_detector_builds_the_named_one():
    assert isinstance(create_detector("haar"), FaceDetector)
    assert isinstance(create_detector("retinaface"), RetinaFaceDetector)
    with pytest.raises(ValueError, match="unknown detector"):
        create_detector("dlib")  # type: ignore[arg-type]


def test_a_retinaface_model_that_cannot_load_stops_the_start_up(model_store: Path, tmp_path: Path):
    settings = Settings(model_store=model_store, reload_interval_s=0, detector="retinaface",
                        retinaface_model=tmp_path / "missing.onnx")
    with pytest.raises(DetectorLoadError, match="missing.onnx"):
        with TestClient(create_app(settings)):
            pass


def test_the_haar_settings_do_not_need_the_retinaface_model(model_store: Path, tmp_path: Path):
    with running_app(model_store, retinaface_model=tmp_path / "missing.onnx") as client:
        assert client.post("/predict?model=cnn10", content=photo()).status_code == 200


@pytest.fixture(scope="module", params=DETECTORS)
def client(request, model_store: Path):
    with running_app(model_store, detector=request.param) as c:
        yield request.param, c


def test_both_detectors_find_the_face_of_every_fixture_photo(client):
    name, c = client
    found = []
    for path in all_photos():
        answer = c.post("/predict?model=cnn10", content=path.read_bytes()).json()
        found.append(len(answer["faces"]))
        for face in answer["faces"]:
            if name == "haar":
                assert set(face) == FACE_KEYS
            else:
                assert set(face) == FACE_KEYS | {"landmarks"}
                assert all(inside(p, face["box"]) for p in face["landmarks"].values())
    # Haar may miss a face or two of these close-ups (test_detector.py); RetinaFace none.
    assert sum(n >= 1 for n in found) >= (4 if name == "haar" else len(found)), found
    if name == "retinaface":
        assert found == [1] * len(found)


def test_both_detectors_find_nothing_in_a_blank_image(client):
    _, c = client
    blank = jpeg(np.full((240, 320, 3), 128, np.uint8))
    assert c.post("/predict?model=cnn10", content=blank).json()["faces"] == []


def test_detect_false_has_no_landmarks(client):
    _, c = client
    (face,) = c.post("/predict?model=cnn10&detect=false", content=photo()).json()["faces"]
    assert set(face) == FACE_KEYS


def test_landmarks_of_a_large_photo_decoded_reduced_are_in_its_own_pixels(model_store: Path):
    small = cv2.imdecode(np.frombuffer(photo(), np.uint8), cv2.IMREAD_COLOR)
    big = cv2.resize(small, None, fx=8, fy=8, interpolation=cv2.INTER_CUBIC)  # 2800 px
    with running_app(model_store, detector="retinaface", retinaface_max_side=350) as c:
        (want,) = c.post("/predict?model=cnn10", content=jpeg(small)).json()["faces"]
        answer = c.post("/predict?model=cnn10", content=jpeg(big)).json()
    assert answer["image"] == {"width": 2800, "height": 2800}
    (face,) = answer["faces"]
    assert all(inside(p, face["box"]) for p in face["landmarks"].values())
    for key, point in face["landmarks"].items():
        assert abs(point["x"] - 8 * want["landmarks"][key]["x"]) < 40
        assert abs(point["y"] - 8 * want["landmarks"][key]["y"]) < 40


def test_openapi_documents_the_optional_landmarks(client):
    _, c = client
    schemas = c.get("/openapi.json").json()["components"]["schemas"]
    face = schemas["Face"]
    assert "landmarks" in face["properties"] and "landmarks" not in face["required"]
    assert set(schemas["Landmarks"]["properties"]) == {
        "eye_left", "eye_right", "nose", "mouth_left", "mouth_right"}
    assert set(schemas["Point"]["required"]) == {"x", "y"}
