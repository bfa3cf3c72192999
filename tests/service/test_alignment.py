"""Face alignment from landmarks (service.preprocess.align_face): eyes level, FER2013 framing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.card import FaceCropSpec
from service.preprocess import (
    ALIGNED_EYE_TO_MOUTH,
    ALIGNED_EYES_CENTRE,
    Box,
    Detection,
    align_face,
    alignment_matrix,
    crop_face,
)
from tests.conftest import gray_photo


@pytest.fixture(scope="module")
def detector(retinaface):
    return retinaface


def roll_degrees(landmarks) -> float:
    (lx, ly), (rx, ry) = landmarks[:2]
    return float(np.degrees(np.arctan2(ry - ly, rx - lx)))


def rotated(image: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    return cv2.warpAffine(image, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE), matrix


def apply(matrix: np.ndarray, points) -> np.ndarray:
    points = np.asarray(points, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_the_matrix_levels_the_eyes_and_frames_the_face_as_fer2013():
    landmarks = [(120, 160), (200, 120), (170, 190), (150, 250), (215, 220)]  # tilted ~27 deg
    out = apply(alignment_matrix(landmarks, 48), landmarks)
    assert out[0, 1] == pytest.approx(out[1, 1], abs=1e-9)  # eyes level
    assert out[0, 0] < out[1, 0]  # and not mirrored
    eyes, mouth = out[:2].mean(axis=0), out[3:].mean(axis=0)
    np.testing.assert_allclose(eyes, np.array(ALIGNED_EYES_CENTRE) * 48, atol=1e-9)
    assert np.hypot(*(mouth - eyes)) == pytest.approx(ALIGNED_EYE_TO_MOUTH * 48)


def test_alignment_levels_a_rotated_face(detector):
    image, rotation = rotated(gray_photo(), 25)
    (face,) = detector.detect(image)
    assert abs(roll_degrees(face.landmarks)) > 18  # the detector sees the tilt
    aligned = align_face(image, face.landmarks, 192)
    (again,) = detector.detect(aligned)
    assert abs(roll_degrees(again.landmarks)) < 7


def test_aligned_crops_of_a_face_and_of_it_rotated_agree(detector):
    original = gray_photo()
    (face,) = detector.detect(original)
    image, rotation = rotated(original, -30)
    moved = [tuple(p) for p in apply(rotation, face.landmarks)]  # the same points, rotated
    straight = align_face(original, face.landmarks, 48).astype(np.float64)
    turned = align_face(image, moved, 48).astype(np.float64)
    plain = crop_face(image, face, FaceCropSpec(), 48).astype(np.float64)
    assert np.abs(straight - turned).mean() < 6
    assert np.abs(straight - plain).mean() > 3 * np.abs(straight - turned).mean()


def test_crop_face_aligns_only_when_asked_and_landmarks_exist(detector):
    image = gray_photo()
    (face,) = detector.detect(image)
    box = Box(face.x, face.y, face.width, face.height)
    on, off = FaceCropSpec(align=True), FaceCropSpec(align=False)
    np.testing.assert_array_equal(crop_face(image, face, on, 48),
                                  align_face(image, face.landmarks, 48))
    np.testing.assert_array_equal(crop_face(image, face, off, 48), crop_face(image, box, off, 48))
    np.testing.assert_array_equal(crop_face(image, box, on, 48), crop_face(image, box, off, 48))
    no_landmarks = Detection(face.x, face.y, face.width, face.height, score=face.score)
    np.testing.assert_array_equal(crop_face(image, no_landmarks, on, 48),
                                  crop_face(image, box, off, 48))


def test_equalisation_and_faces_at_the_edge():
    image = gray_photo()
    landmarks = [(5, 20), (40, 18), (22, 40), (10, 60), (38, 58)]  # a face cut by the edge
    crop = align_face(image, landmarks, 48, equalize=True)
    assert crop.shape == (48, 48) and crop.dtype == np.uint8
    assert crop.min() == 0 and crop.max() == 255  # equalised
    tiny = align_face(image[:30, :30], [(5, 8), (20, 8), (12, 14), (7, 22), (19, 22)], 48)
    assert tiny.shape == (48, 48)  # a crop smaller than the input is upscaled, not refused
