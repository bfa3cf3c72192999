"""Test-time augmentation (TTA): the extra views of each face a model card asks for, and
the average of their probabilities. Used by the service and by train/ (evaluation,
calibration), so both see exactly the same views."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Test-time augmentations, applied in this order whatever the card's order: `five_crop`
# adds the four corner crops and the centre crop (side 11/12 of the face, scaled back up),
# `hflip` then adds the mirror image of every view so far. Both: the usual "ten-crop"
# (plus the whole face and its mirror).
TTA_NAMES = ("five_crop", "hflip")
FIVE_CROP_FRACTION = 11 / 12


def tta_views(tta: Sequence[str]) -> int:
    """How many views of each face `with_tta` lays out for this TTA list."""
    unknown = set(tta) - set(TTA_NAMES)
    if unknown:
        raise ValueError(f"unknown test-time augmentation {sorted(unknown)}; "
                         f"known: {list(TTA_NAMES)}")
    return (6 if "five_crop" in tta else 1) * (2 if "hflip" in tta else 1)


def _linear_resize_matrix(source: int, target: int) -> np.ndarray:
    """[target, source] weights of linear interpolation with pixel centres at +0.5, as
    cv2.INTER_LINEAR places them: `matrix @ image @ matrix.T` resizes a square image."""
    position = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, source - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, source - 1)
    weight = (position - low).astype(np.float32)
    matrix = np.zeros((target, source), dtype=np.float32)
    matrix[np.arange(target), low] += 1 - weight
    matrix[np.arange(target), high] += weight
    return matrix


def five_crops(batch: np.ndarray) -> list[np.ndarray]:
    """The four corner crops and the centre crop of an NCHW batch of square faces, each
    scaled back to the batch's size."""
    size = batch.shape[-1]
    side = round(size * FIVE_CROP_FRACTION)
    far, mid = size - side, (size - side) // 2
    resize = _linear_resize_matrix(side, size)
    return [resize @ batch[:, :, y:y + side, x:x + side] @ resize.T
            for y, x in ((0, 0), (0, far), (far, 0), (far, far), (mid, mid))]


def with_tta(batch: np.ndarray, tta: Sequence[str]) -> np.ndarray:
    """Append test-time views of an NCHW batch: [batch, view1, ...] along axis 0
    (`tta_views(tta)` blocks of len(batch))."""
    tta_views(tta)  # rejects unknown names
    views = [batch]
    if "five_crop" in tta:
        views += five_crops(batch)
    if "hflip" in tta:
        views += [view[:, :, :, ::-1] for view in views]
    return np.ascontiguousarray(np.concatenate(views, axis=0), dtype=np.float32)


def merge_tta(probabilities: np.ndarray, variant_count: int) -> np.ndarray:
    """Average the per-view probabilities that `with_tta` laid out along axis 0."""
    return probabilities.reshape(variant_count, -1, probabilities.shape[-1]).mean(axis=0)
