"""The fast paths of /predict answer exactly what the plain paths would (bench/RESULTS.md)."""

import struct

import cv2
import numpy as np
import pytest

from service.detector import DetectorConfig, FaceDetector
from service.imaging import decode, decode_grayscale
from service.onnx_model import OnnxModel
from service.preprocess import Box
from tests.conftest import photo, running_app


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """`jpeg` with an APP1 Exif segment holding only the Orientation tag."""
    entry = struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def big_photo(factor: int, fmt: str = ".jpg") -> tuple[bytes, np.ndarray]:
    """The test photo upscaled `factor` times (a large camera-like image), encoded."""
    gray = decode_grayscale(photo(), 10**8)
    big = cv2.resize(gray, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
    return cv2.imencode(fmt, big)[1].tobytes(), big


def test_a_large_jpeg_is_decoded_reduced_but_keeps_its_own_size():
    data, big = big_photo(4)  # 1400 x 1400
    image = decode(data, 10**8, min_side=640)
    assert image.reduced and image.gray.shape == (700, 700)
    assert (image.width, image.height) == (1400, 1400)
    assert image.to_original(Box(10, 20, 100, 50)) == Box(20, 40, 200, 100)
    # Never below what the caller needs, and nothing reduced when it needs it all.
    assert decode(data, 10**8, min_side=350).gray.shape == (350, 350)
    assert not decode(data, 10**8, min_side=1400).reduced
    assert not decode(data, 10**8).reduced


def test_odd_sizes_map_back_inside_the_image():
    gray = np.random.default_rng(0).integers(0, 255, (333, 1001), dtype=np.uint8)
    image = decode(cv2.imencode(".jpg", gray)[1].tobytes(), 10**8, min_side=120)
    assert image.gray.shape == (42, 126) and (image.width, image.height) == (1001, 333)
    whole = image.to_original(Box(0, 0, 126, 42))
    assert whole == Box(0, 0, 1001, 333)


def test_other_formats_are_never_reduced():
    data, _ = big_photo(4, ".png")
    image = decode(data, 10**8, min_side=100)
    assert not image.reduced and image.gray.shape == (1400, 1400)


def test_exif_rotation_is_applied_and_the_size_reported_rotated():
    wide = np.zeros((400, 1000), np.uint8)
    wide[:100, :200] = 255
    data = with_exif_orientation(cv2.imencode(".jpg", wide)[1].tobytes(), 6)  # 90 deg clockwise
    full = decode(data, 10**8)
    assert full.gray.shape == (1000, 400) and (full.width, full.height) == (400, 1000)
    reduced = decode(data, 10**8, min_side=200)
    assert reduced.reduced and (reduced.width, reduced.height) == (400, 1000)
    assert reduced.gray.shape == (250, 100)  # 1/4, rotated like the full decode
    bright = np.argwhere(reduced.gray > 128)
    box = reduced.to_original(Box(int(bright[:, 1].min()), int(bright[:, 0].min()),
                                  int(np.ptp(bright[:, 1])) + 1, int(np.ptp(bright[:, 0])) + 1))
    bright_full = np.argwhere(full.gray > 128)
    assert abs(box.x - bright_full[:, 1].min()) <= 4 and abs(box.y - bright_full[:, 0].min()) <= 4
    assert abs(box.width - (np.ptp(bright_full[:, 1]) + 1)) <= 4


def test_faces_found_in_a_reduced_decode_are_those_of_a_full_one():
    data, big = big_photo(4)
    detector = FaceDetector(DetectorConfig(max_side=320))
    (full_box,) = detector.detect(big)
    image = decode(data, 10**8, min_side=640)
    (box,) = [image.to_original(b) for b in detector.detect(image.gray)]
    for a, b in zip((box.x, box.y, box.width, box.height),
                    (full_box.x, full_box.y, full_box.width, full_box.height), strict=True):
        assert abs(a - b) <= 8


def test_predict_on_a_large_jpeg_reports_original_coordinates(model_store):
    jpeg, big = big_photo(4)
    png = cv2.imencode(".png", big)[1].tobytes()  # decoded in full: the reference
    with running_app(model_store, detect_max_side=320, detect_fallback_max_side=0,
                     detect_min_neighbors=5, detect_equalize=True) as client:
        pipeline = client.app.state.runtime.pipeline
        target = client.app.state.runtime.resolve("cnn10", None)
        assert pipeline.pixels_needed(target, detect=True) == 640  # 320 * 48 / 24
        fast = client.post("/predict?model=cnn10", content=jpeg).json()
        slow = client.post("/predict?model=cnn10", content=png).json()
        small = client.post("/predict?model=cnn10", content=photo()).json()
    assert fast["image"] == slow["image"] == {"width": 1400, "height": 1400}
    (face,), (reference,), (original,) = fast["faces"], slow["faces"], small["faces"]
    for key in ("x", "y", "width", "height"):
        assert abs(face["box"][key] - reference["box"][key]) <= 8
        assert abs(face["box"][key] - 4 * original["box"][key]) <= 16
    for name, p in reference["probabilities"].items():
        assert face["probabilities"][name] == pytest.approx(p, abs=0.05)


def test_whole_image_mode_on_a_large_jpeg_reports_the_whole_image(model_store):
    jpeg, _ = big_photo(4)
    with running_app(model_store) as client:
        body = client.post("/predict?detect=false", content=jpeg).json()
    assert body["image"] == {"width": 1400, "height": 1400}
    assert body["faces"][0]["box"] == {"x": 0, "y": 0, "width": 1400, "height": 1400}


def test_ensemble_members_fed_alike_share_one_input_batch(model_store):
    with running_app(model_store) as client:
        runtime = client.app.state.runtime
        target = runtime.resolve("ensemble", None)
        prepared = runtime.pipeline.prepare(photo(), target, detect=True)
    assert len(prepared.inputs) == 2 and prepared.inputs[0] is prepared.inputs[1]


def test_onnx_runtime_threads_do_not_spin(model_store):
    model = OnnxModel(model_store / "cnn10" / "1", ["CPUExecutionProvider"], threads=2)
    options = model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
