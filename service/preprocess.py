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
    """Cut `box` (grown by `crop.padding` on every side) out of `gray`, as size x size uint8.

    Parts of the grown box outside the image are filled by replicating the border,
    so a face at the edge keeps its aspect ratio instead of being stretched.
    """
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


def normalize(crops: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 crops [N, H, W] -> float32 network input [N, 1, H, W]."""
    if crops.ndim != 3:
        raise ValueError(f"expected crops of shape [N, H, W], got {crops.shape}")
    scale = np.float32(1.0 / (255.0 * spec.std))
    shift = np.float32(spec.mean / spec.std)
    return (crops.astype(np.float32) * scale - shift)[:, None, :, :]


def with_tta(batch: np.ndarray, tta: list[str]) -> np.ndarray:
    """Append test-time variants of an NCHW batch: [batch, variant1, ...] along axis 0."""
    variants = [batch]
    for name in tta:
        if name == "hflip":
            variants.append(batch[:, :, :, ::-1])
        else:
            raise ValueError(f"unknown test-time augmentation {name!r}")
    return np.ascontiguousarray(np.concatenate(variants, axis=0))


def merge_tta(probabilities: np.ndarray, variant_count: int) -> np.ndarray:
    """Average the per-variant probabilities that `with_tta` laid out along axis 0."""
    return probabilities.reshape(variant_count, -1, probabilities.shape[-1]).mean(axis=0)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
