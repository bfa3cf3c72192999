import cv2
import numpy as np
import pytest

from service.card import ModelCard
from service.preprocess import softmax
from service.tta import merge_tta, tta_views, with_tta


def faces(count: int = 3, size: int = 48) -> np.ndarray:
    return np.random.default_rng(0).random((count, 1, size, size)).astype(np.float32)


def test_hflip_round_trip():
    batch = faces(3, 4)
    stacked = with_tta(batch, ["hflip"])
    assert stacked.shape == (6, 1, 4, 4)
    np.testing.assert_array_equal(stacked[3:], batch[:, :, :, ::-1])
    probabilities = softmax(np.random.default_rng(1).random((6, 7)))
    merged = merge_tta(probabilities, 2)
    np.testing.assert_allclose(merged, (probabilities[:3] + probabilities[3:]) / 2)


def test_five_crop_views_are_the_corner_and_centre_crops_scaled_back_as_opencv_does():
    batch = faces()
    stacked = with_tta(batch, ["five_crop"])
    assert stacked.shape == (6 * 3, 1, 48, 48)
    np.testing.assert_array_equal(stacked[:3], batch)
    side = 44  # 11/12 of 48
    origins = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]
    for view, (y, x) in enumerate(origins, start=1):
        for face in range(3):
            expected = cv2.resize(batch[face, 0, y:y + side, x:x + side], (48, 48),
                                  interpolation=cv2.INTER_LINEAR)
            np.testing.assert_allclose(stacked[view * 3 + face, 0], expected, atol=1e-3)


def test_ten_crop_mirrors_every_view_whatever_the_order_of_the_names():
    batch = faces()
    both = with_tta(batch, ["hflip", "five_crop"])
    assert tta_views(["hflip", "five_crop"]) == 12 and both.shape[0] == 12 * 3
    np.testing.assert_array_equal(both, with_tta(batch, ["five_crop", "hflip"]))
    np.testing.assert_allclose(both[6 * 3:], both[:6 * 3, :, :, ::-1])


def test_unknown_augmentations_are_refused_by_the_card_and_the_function():
    with pytest.raises(ValueError, match="rotate"):
        tta_views(["rotate"])
    card = {"name": "m", "version": 1, "architecture": "a",
            "classes": ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"],
            "input": {"size": 48, "mean": 0.5, "std": 0.25}, "tta": ["rotate"]}
    with pytest.raises(ValueError, match="rotate"):
        ModelCard.model_validate(card)
    card["tta"] = ["five_crop", "hflip"]
    assert ModelCard.model_validate(card).tta == ["five_crop", "hflip"]
