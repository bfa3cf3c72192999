from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

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


def test_a_border_finds_faces_that_fill_the_frame_and_boxes_stay_inside():
    gray = gray_photo("surprise/Kristy_Curry_0001.jpg")
    assert FaceDetector(DetectorConfig(border=0)).detect(gray) == []
    (box,) = FaceDetector(DetectorConfig(border=0.25)).detect(gray)
    assert box.x >= 0 and box.y >= 0
    assert box.x + box.width <= 350 and box.y + box.height <= 350 and box.width > 150
