"""Face crop -> network input, and logits -> probabilities.

Written once and imported by both the service and `train/` (training, evaluation
and ONNX parity checks): cropping, resizing and normalisation are the same code on
both sides.

They differ in one respect, on purpose. The service histogram-equalises a face it
*detected* in a photo when the model's card says `face_crop.equalize` (every committed
card does: on ../shared/data/natural-dev it measured better, 142 vs 134 faces right for
the v2 ensemble). Training feeds FER2013's faces as they are, unless the augmentation
option `equalize_p` (train/augment.py) equalises a share of them with `crop_face`, as
served. An image sent with `detect=false` already is a face crop like the training data
and is never equalised. Only numpy and OpenCV here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from service.card import FaceCropSpec, InputSpec


@dataclass(frozen=True, slots=True)
class Box:
    x: int
    y: int
    width: int
    height: int

    @property
    def area(self) -> int:
        return self.width * self.height


Point = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Detection(Box):
    """A face box from a detector that also scores it and, for RetinaFace, gives five
    landmarks (x, y) in the same pixels: the eye on the image's left, the eye on its
    right, the nose tip, the mouth corner on the left, the mouth corner on the right."""

    score: float | None = None
    landmarks: tuple[Point, Point, Point, Point, Point] | None = None


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """A decoded OpenCV image (gray, BGR or BGRA) as a 2-D uint8 array."""
    if image.ndim == 2:
        return image
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image[:, :, 0]


def whole_image_box(gray: np.ndarray) -> Box:
    return Box(0, 0, int(gray.shape[1]), int(gray.shape[0]))


# An image that already is a face crop like the training data (`detect=false`, a FER2013
# face) is used as it is: the card's face-crop settings adapt faces *detected* in photos.
WHOLE_IMAGE_CROP = FaceCropSpec()


def crop_face(gray: np.ndarray, box: Box, crop: FaceCropSpec, size: int) -> np.ndarray:
    """Cut `box` (grown by `crop.padding` on every side) out of `gray`, as size x size uint8;
    with `crop.align` and a `Detection` that has landmarks, `align_face` instead.

    Parts of the grown box outside the image are filled by replicating the border,
    so a face at the edge keeps its aspect ratio instead of being stretched.
    """
    landmarks = getattr(box, "landmarks", None)
    if crop.align and landmarks is not None:
        return align_face(gray, landmarks, size, crop.equalize)
    pad_x = int(round(box.width * crop.padding))
    pad_y = int(round(box.height * crop.padding))
    x0, y0 = box.x - pad_x, box.y - pad_y
    x1, y1 = box.x + box.width + pad_x, box.y + box.height + pad_y
    height, width = gray.shape
    inside = gray[max(y0, 0) : min(y1, height), max(x0, 0) : min(x1, width)]
    if inside.size == 0:
        raise ValueError(f"face box {box} lies outside the {width}x{height} image")
    if (x0, y0, x1, y1) != (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)):
        inside = cv2.copyMakeBorder(
            inside,
            max(-y0, 0),
            max(y1 - height, 0),
            max(-x0, 0),
            max(x1 - width, 0),
            cv2.BORDER_REPLICATE,
        )
    if crop.equalize:
        inside = cv2.equalizeHist(np.ascontiguousarray(inside))
    shrinking = inside.shape[0] > size or inside.shape[1] > size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(inside, (size, size), interpolation=interpolation)


# Where FER2013 has the eyes and mouth, as fractions of the crop side: medians of
# RetinaFace's landmarks on 1,489 of 1,500 random training faces (`python -m
# bench.face_template`). Its faces are roughly aligned already (median roll 4.7 degrees).
ALIGNED_EYES_CENTRE = (0.501, 0.387)
ALIGNED_EYE_TO_MOUTH = 0.385


def alignment_matrix(landmarks: Sequence[Point], size: int) -> np.ndarray:
    """The 2x3 similarity (rotation, scale, shift) that levels the eyes and puts the eye
    centre and the eye-to-mouth distance where FER2013's faces have them in a size x size crop.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    eye_left, eye_right, _, mouth_left, mouth_right = points
    eyes = (eye_left + eye_right) / 2
    mouth = (mouth_left + mouth_right) / 2
    dx, dy = eye_right - eye_left
    angle = np.arctan2(dy, dx)
    distance = float(np.hypot(*(mouth - eyes)))
    scale = ALIGNED_EYE_TO_MOUTH * size / max(distance, 1e-6)
    cos, sin = scale * np.cos(-angle), scale * np.sin(-angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    target = np.array(ALIGNED_EYES_CENTRE) * size
    return np.hstack([rotation, (target - rotation @ eyes)[:, None]])


def align_face(gray: np.ndarray, landmarks: Sequence[Point], size: int,
               equalize: bool = False) -> np.ndarray:
    """The face of five landmarks (`Detection.landmarks`) rotated so its eyes are level and
    cropped around its eye/mouth geometry as FER2013 frames faces: size x size uint8.

    The crop is first cut at its own resolution in `gray` (never above it), equalised
    there as `crop_face` does, then shrunk with area averaging, so it is not aliased.
    """
    matrix = alignment_matrix(landmarks, size)
    source_side = size / float(np.hypot(*matrix[:, 0]))  # the crop's side in `gray` pixels
    side = max(size, min(round(source_side), max(gray.shape)))
    matrix = matrix * (side / size)
    crop = cv2.warpAffine(gray, matrix, (side, side), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
    if equalize:
        crop = cv2.equalizeHist(crop)
    if side == size:
        return crop
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def normalize(crops: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 crops [N, H, W] -> float32 network input [N, 1, H, W]."""
    if crops.ndim != 3:
        raise ValueError(f"expected crops of shape [N, H, W], got {crops.shape}")
    scale = np.float32(1.0 / (255.0 * spec.std))
    shift = np.float32(spec.mean / spec.std)
    return (crops.astype(np.float32) * scale - shift)[:, None, :, :]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
