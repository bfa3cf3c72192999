"""train/degrade.py: blur, JPEG artefacts and tone changes of real photos, at random."""

import math

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import FER_MINI
from train.augment import AugmentConfig
from train.data import load_split
from train.degrade import change_tone, degrade_randomly, jpeg_round_trip


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return load_split(FER_MINI, "train", cache_dir=None).images


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sharpness(face: np.ndarray) -> float:
    return float(cv2.Laplacian(face.astype(np.float32), cv2.CV_32F).var())


def test_off_by_default_and_then_draws_no_random_number(faces):
    generator = seeded()
    assert degrade_randomly(faces, AugmentConfig(), generator) is faces
    assert torch.equal(generator.get_state(), seeded().get_state())


def test_blur_softens_every_chosen_face_and_keeps_its_shape_and_type(faces):
    out = degrade_randomly(faces, AugmentConfig(blur_p=1.0), seeded())
    assert out.shape == faces.shape and out.dtype == np.uint8
    for face, blurred in zip(faces, out, strict=True):
        assert sharpness(blurred) < sharpness(face)


def test_jpeg_leaves_block_artefacts_that_grow_as_quality_falls(faces):
    face = faces[0]
    errors = [np.abs(jpeg_round_trip(face, q).astype(int) - face).mean() for q in (90, 50, 10)]
    assert 0 < errors[0] < errors[1] < errors[2]
    out = degrade_randomly(faces, AugmentConfig(jpeg_p=1.0, jpeg_quality=(10, 10)), seeded())
    for face, compressed in zip(faces, out, strict=True):
        np.testing.assert_array_equal(compressed, jpeg_round_trip(face, 10))


def test_tone_changes_contrast_about_the_mean_and_shifts_brightness():
    face = np.tile(np.arange(60, 180, 2.5).astype(np.uint8), (48, 1))[:, :48]
    flatter = change_tone(face, 0.5, 0.0)
    assert abs(float(flatter.mean()) - float(face.mean())) < 1.0
    assert flatter.std() == pytest.approx(face.std() * 0.5, rel=0.05)
    brighter = change_tone(face, 1.0, 30.0)
    np.testing.assert_array_equal(brighter, face + 30)
    assert change_tone(face, 1.0, 500.0).max() == 255  # clipped, not wrapped
    assert change_tone(face, 1.0, -500.0).min() == 0


def test_each_kind_hits_its_share_of_faces_and_the_input_is_left_alone(faces):
    many = np.concatenate([faces] * 6)
    before = many.copy()
    p = 0.3
    out = degrade_randomly(many, AugmentConfig(blur_p=p), seeded(1))
    np.testing.assert_array_equal(many, before)
    changed = np.array([not np.array_equal(o, f) for o, f in zip(out, many, strict=True)])
    n = len(many)
    assert abs(changed.sum() - p * n) < 4 * math.sqrt(n * p * (1 - p)), changed.sum()
    np.testing.assert_array_equal(out, degrade_randomly(many, AugmentConfig(blur_p=p), seeded(1)))
    assert not np.array_equal(out, degrade_randomly(many, AugmentConfig(blur_p=p), seeded(2)))


def test_one_kinds_probability_does_not_move_anothers_draws(faces):
    """The faces that get JPEG artefacts are the same with and without blur switched on."""
    jpeg_only = degrade_randomly(faces, AugmentConfig(jpeg_p=0.5), seeded(3))
    both = degrade_randomly(faces, AugmentConfig(jpeg_p=0.5, tone_p=0.5), seeded(3))
    hit_alone = [not np.array_equal(o, f) for o, f in zip(jpeg_only, faces, strict=True)]
    toned = degrade_randomly(faces, AugmentConfig(tone_p=0.5), seeded(3))
    hit_by_tone = [not np.array_equal(o, f) for o, f in zip(toned, faces, strict=True)]
    hit_both = [not np.array_equal(o, f) for o, f in zip(both, faces, strict=True)]
    assert hit_both == [a or b for a, b in zip(hit_alone, hit_by_tone, strict=True)]


@pytest.mark.parametrize(
    "options, word",
    [
        ({"blur_p": 1.5}, "blur_p"),
        ({"jpeg_p": -0.1}, "jpeg_p"),
        ({"tone_p": 2}, "tone_p"),
        ({"blur_sigma": (1.0, 0.5)}, "blur_sigma"),
        ({"jpeg_quality": (0, 50)}, "jpeg_quality"),
        ({"contrast": 1.0}, "contrast"),
        ({"brightness": -0.1}, "brightness"),
    ],
)
def test_settings_outside_their_range_are_refused(options, word):
    with pytest.raises(ValueError, match=word):
        AugmentConfig(**options)
