from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from service.detector import DetectorConfig, FaceDetector
from service.imaging import decode_grayscale
from tests.conftest import all_photos, photo


def gray_photo(name: str = "happy/Marilyn_Monroe_0002.jpg") -> np.ndarray:
    return decode_grayscale(photo(name), max_pixels=10**8)


def test_finds_the_face_in_most_real_photos():
    detector = FaceDetector()
    found = [len(detector.detect(decode_grayscale(p.read_bytes(), 10**8))) for p in all_photos()]
    assert sum(1 for n in found if n >= 1) >= 4, found


def test_blank_image_has_no_face():
    assert FaceDetector().detect(np.full((200, 300), 128, np.uint8)) == []


def test_boxes_of_a_downscaled_search_map_back_to_the_original_image():
    gray = gray_photo()
    (box,) = FaceDetector(DetectorConfig(max_side=1000, border=0)).detect(gray)
    big = cv2.resize(gray, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)  # 1400 px
    (big_box,) = FaceDetector(DetectorConfig(max_side=350, border=0)).detect(big)
    for small, large in zip((box.x, box.y, box.width, box.height),
                            (big_box.x, big_box.y, big_box.width, big_box.height), strict=True):
        assert abs(large - 4 * small) <= 12
    assert big_box.x + big_box.width <= big.shape[1] and big_box.y + big_box.height <= big.shape[0]


def test_largest_face_comes_first_and_max_faces_is_applied():
    left = gray_photo()
    right = cv2.resize(gray_photo("happy/Hamid_Karzai_0011.jpg"), (250, 250))
    canvas = np.full((350, 620), 255, np.uint8)
    canvas[:, :350] = left
    canvas[50:300, 360:610] = right
    boxes = FaceDetector().detect(canvas)
    assert len(boxes) >= 2
    assert boxes[0].area >= boxes[1].area and boxes[0].x < 350
    assert len(FaceDetector(DetectorConfig(max_faces=1)).detect(canvas)) == 1


def test_one_detector_is_safe_from_many_threads():
    detector = FaceDetector()
    gray = gray_photo()
    expected = detector.detect(gray)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: detector.detect(gray), range(32)))
    assert all(result == expected for result in results)


# With the former plan's strictness (min_neighbors 5, equalised, one pass), this close-up's
# face is found only with a border.
STRICT = {"min_neighbors": 5, "equalize": True, "fallback_max_side": 0, "max_side": 320}


def test_a_border_finds_faces_that_fill_the_frame_and_boxes_stay_inside():
    gray = gray_photo("surprise/Kristy_Curry_0001.jpg")
    assert FaceDetector(DetectorConfig(**STRICT, border=0)).detect(gray) == []
    (box,) = FaceDetector(DetectorConfig(**STRICT, border=0.25)).detect(gray)
    assert box.x >= 0 and box.y >= 0
    assert box.x + box.width <= 350 and box.y + box.height <= 350 and box.width > 150


def test_the_second_pass_runs_only_when_the_first_finds_nothing(monkeypatch):
    gray = gray_photo("surprise/Kristy_Curry_0001.jpg")  # found only with a border
    plain = DetectorConfig(**STRICT, border=0)
    with_fallback = DetectorConfig(**{**STRICT, "fallback_max_side": 320}, border=0,
                                   fallback_border=0.25, fallback_min_neighbors=5)
    assert FaceDetector(plain).detect(gray) == []
    (box,) = FaceDetector(with_fallback).detect(gray)
    assert box.width > 150
    detector = FaceDetector(with_fallback)
    searches = []
    original = detector._search
    monkeypatch.setattr(detector, "_search", lambda *a: searches.append(a[1:]) or original(*a))
    assert detector.detect(gray_photo()) and len(searches) == 1  # found at once: one pass
    searches.clear()
    assert detector.detect(np.full((200, 300), 128, np.uint8)) == []
    assert [s[:2] for s in searches] == [(320, 0), (320, 0.25)]  # nothing: both passes


def test_decode_side_covers_the_largest_search():
    assert FaceDetector(DetectorConfig(max_side=200, fallback_max_side=0)).decode_side(48) == 400
    config = DetectorConfig(max_side=160, min_size=24, fallback_max_side=320)
    assert FaceDetector(config).decode_side(48) == 640
    assert FaceDetector(config).decode_side(12) == 320


def test_each_shipped_frontal_face_cascade_is_selectable_and_finds_faces():
    gray = gray_photo()
    for cascade in ("default", "alt", "alt2"):
        detector = FaceDetector(DetectorConfig(cascade=cascade))
        assert detector.cascade_path.endswith(f"haarcascade_frontalface_{cascade}.xml")
        assert len(detector.detect(gray)) >= 1, cascade


def test_an_unknown_cascade_is_a_start_up_error_naming_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="FER_HAAR_CASCADE: one of .*alt2"):
        FaceDetector(DetectorConfig(cascade="nonexistent"))
    broken = tmp_path / "broken.xml"
    broken.write_text("<opencv_storage></opencv_storage>")
    with pytest.raises(RuntimeError, match="could not load Haar cascade"):
        FaceDetector(DetectorConfig(cascade=str(broken)))


def iou(a, b) -> float:
    x0, y0 = max(a.x, b.x), max(a.y, b.y)
    x1, y1 = min(a.x + a.width, b.x + b.width), min(a.y + a.height, b.y + b.height)
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / (a.area + b.area - inter)


def test_searching_small_faces_without_the_border_finds_the_faces_one_search_finds():
    one_search = FaceDetector(DetectorConfig(border_min_face=0))
    split = FaceDetector(DetectorConfig(border_min_face=0.6))
    # A face under the split in a camera frame (30 of the 36 px it is searched at).
    small_face = np.full((720, 1280), 90, np.uint8)
    small_face[200:560, 700:1060] = cv2.resize(gray_photo(), (360, 360))
    images = [decode_grayscale(p.read_bytes(), 10**8) for p in all_photos()] + [small_face]
    matched = 0
    for gray in images:
        expected, got = one_search.detect(gray), split.detect(gray)
        assert len(got) == len(expected)
        matched += sum(1 for a, b in zip(expected, got, strict=True) if iou(a, b) > 0.7)
    assert matched >= 5
    (box,) = split.detect(small_face)
    assert iou(box, type(box)(700, 200, 360, 360)) > 0.5


class RecordingClassifier:
    """A classifier that notes each search's image shape, minSize and maxSize."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def detectMultiScale(self, image, **kwargs):  # noqa: N802 (OpenCV's name)
        self.calls.append((image.shape, kwargs.get("minSize"), kwargs.get("maxSize")))
        return self.real.detectMultiScale(image, **kwargs)


def recorded_searches(monkeypatch, detector: FaceDetector) -> list:
    recording = RecordingClassifier(detector._classifier())
    monkeypatch.setattr(detector, "_classifier", lambda: recording)
    return recording.calls


def test_the_split_searches_small_windows_on_the_image_and_large_on_the_bordered_one(
        monkeypatch):
    detector = FaceDetector(DetectorConfig(max_side=160, border=0.25, border_min_face=0.6,
                                           room_check=False))
    calls = recorded_searches(monkeypatch, detector)
    assert detector.detect(gray_photo())  # 350x350: searched at 107 px, 160 with the border
    (coarse_shape, coarse_min, _), (fine_shape, fine_min, fine_max) = calls
    assert fine_shape == (107, 107) and coarse_shape == (161, 161)
    assert fine_min == (24, 24) and fine_max == (63, 63) and coarse_min == (64, 64)


def test_a_close_up_skips_the_small_windows_no_face_beside_it_could_use(monkeypatch):
    detector = FaceDetector(DetectorConfig(max_side=160, border=0.25, border_min_face=0.6))
    calls = recorded_searches(monkeypatch, detector)
    (box,) = detector.detect(gray_photo())
    (_, coarse_min, _), (fine_shape, (fine_min, _), _) = calls
    assert coarse_min == (64, 64) and fine_shape == (107, 107)
    # From half the face's side (in the 107 px search), where its own windows start.
    assert fine_min >= 0.5 * box.width * 107 / 350 - 1 and fine_min > 24
    full = FaceDetector(DetectorConfig(room_check=False))
    for path in all_photos():
        gray = decode_grayscale(path.read_bytes(), 10**8)
        expected, got = full.detect(gray), FaceDetector().detect(gray)
        assert len(got) == len(expected), path.name
        assert all(iou(a, b) > 0.9 for a, b in zip(expected, got, strict=True)), path.name


def test_a_smaller_face_beside_a_close_up_is_still_found(monkeypatch):
    canvas = np.full((400, 600), 120, np.uint8)
    canvas[:, :400] = cv2.resize(gray_photo(), (400, 400))
    canvas[110:260, 410:560] = cv2.resize(gray_photo("happy/Hamid_Karzai_0011.jpg"), (150, 150))
    detector = FaceDetector()
    calls = recorded_searches(monkeypatch, detector)
    large, small = detector.detect(canvas)
    assert large.x < 100 and large.width > 300
    assert iou(small, type(small)(410, 110, 150, 150)) > 0.7
    # The small windows searched only the strip right of the large face, not the whole image.
    strips = [shape for shape, (smallest, _), _ in calls if smallest == 24]
    assert strips and all(shape[1] < 107 / 2 for shape in strips)


def test_the_searches_beside_a_face_larger_than_the_image_stay_under_the_split():
    detector = FaceDetector()
    # 107x60 (a 16:9 frame at side 160): a face box of 80 px, taller than the image, whose
    # half side (40) exceeds the split (0.6 x 60 = 36).
    windows = np.array([[10 + i, -10, 80, 80] for i in range(5)], dtype=np.int64)
    searches = detector._beside_largest(windows, (60, 107), min_neighbors=3, split=36)
    assert searches and all(largest < 36 for _, _, largest in searches)
    assert any(region[0] > 0 for region, _, _ in searches)  # the strip right of the face
