"""train/augment.py: the batch warp, crop, erasing, and the optional equalisation."""

import math

import cv2
import numpy as np
import pytest
import torch

from service.card import FaceCropSpec
from service.preprocess import crop_face, whole_image_box
from tests.conftest import FER_MINI
from train.augment import AugmentConfig, augment, equalize_randomly
from train.data import load_split

IDENTITY = AugmentConfig(rotation_deg=0, scale=0, shift=0, hflip=False, erase_p=0)


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """The committed FER2013 faces, uint8 [N, 48, 48]."""
    return load_split(FER_MINI, "train", cache_dir=None).images


def batch_of(faces: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(faces.astype(np.float32) / 255.0)[:, None]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_defaults_change_every_batch_and_keep_its_shape(faces):
    batch = batch_of(faces[:32])
    out = augment(batch, AugmentConfig(), seeded())
    assert out.shape == batch.shape and out.dtype == batch.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    changed = (out - batch).abs().flatten(1).amax(dim=1) > 1e-3
    assert changed.all()


def test_the_same_seed_gives_the_same_batch_and_another_seed_another(faces):
    batch = batch_of(faces[:16])
    config = AugmentConfig(crop=44, erase_p=0.5)
    assert torch.equal(augment(batch, config, seeded(3)), augment(batch, config, seeded(3)))
    assert not torch.equal(augment(batch, config, seeded(3)), augment(batch, config, seeded(4)))


def test_no_rotation_scale_shift_or_flip_leaves_the_faces_as_they_are(faces):
    batch = batch_of(faces[:16])
    torch.testing.assert_close(augment(batch, IDENTITY, seeded()), batch, atol=1e-5, rtol=0)


def test_the_flip_mirrors_about_half_of_the_faces_and_leaves_the_rest(faces):
    batch = batch_of(faces)
    config = AugmentConfig(rotation_deg=0, scale=0, shift=0, hflip=True, erase_p=0)
    out = augment(batch, config, seeded())
    same = (out - batch).abs().flatten(1).amax(dim=1) < 1e-5
    mirrored = (out - batch.flip(-1)).abs().flatten(1).amax(dim=1) < 1e-5
    assert (same | mirrored).all()
    flipped = int(mirrored.sum())
    n = len(batch)
    assert abs(flipped - n / 2) < 4 * math.sqrt(n / 4), flipped


def test_rotation_stays_within_its_range(faces):
    """A face rotated by at most 10 degrees correlates more with itself than one at 30."""
    batch = batch_of(faces[:32])

    def correlation(config: AugmentConfig) -> float:
        out = augment(batch, config, seeded())
        a, b = batch.flatten(1) - batch.mean(), out.flatten(1) - out.mean()
        return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())

    small = correlation(AugmentConfig(rotation_deg=10, scale=0, shift=0, hflip=False, erase_p=0))
    large = correlation(AugmentConfig(rotation_deg=30, scale=0, shift=0, hflip=False, erase_p=0))
    assert 1 > small > large


def test_the_random_crop_is_a_window_of_the_face(faces):
    batch = batch_of(faces[:8])
    config = AugmentConfig(rotation_deg=0, scale=0, shift=0, hflip=False, erase_p=0, crop=40)
    out = augment(batch, config, seeded())
    assert out.shape == (8, 1, 40, 40)
    for face, window in zip(batch[:, 0], out[:, 0], strict=True):
        found = [(y, x) for y in range(9) for x in range(9)
                 if torch.allclose(face[y : y + 40, x : x + 40], window, atol=1e-5)]
        assert found, "the crop is no 40x40 window of its face"


def test_erasing_replaces_one_rectangle_of_the_chosen_faces(faces):
    batch = batch_of(faces[:64])
    config = AugmentConfig(rotation_deg=0, scale=0, shift=0, hflip=False, erase_p=1.0)
    out = augment(batch, config, seeded())
    for face, erased in zip(batch[:, 0], out[:, 0], strict=True):
        rows, cols = torch.nonzero((face - erased).abs() > 1e-5, as_tuple=True)
        assert len(rows)  # every face was chosen
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        area = height * width / (48 * 48)
        assert 0.02 * 0.5 <= area <= 0.2 * 1.5  # one rectangle of the configured size
        assert len(rows) <= height * width
    none = AugmentConfig(rotation_deg=0, scale=0, shift=0, hflip=False, erase_p=0.0)
    torch.testing.assert_close(augment(batch, none, seeded()), batch, atol=1e-5, rtol=0)


# -- histogram equalisation, as the service does to detected faces ---------------------
def test_equalising_is_off_by_default_and_then_draws_no_random_number(faces):
    assert AugmentConfig().equalize_p == 0.0
    generator = seeded()
    assert equalize_randomly(faces, 0.0, generator) is faces
    assert torch.equal(generator.get_state(), seeded().get_state())


def test_every_chosen_face_is_equalised_as_the_service_equalises_a_detected_face(faces):
    out = equalize_randomly(faces, 1.0, seeded())
    for face, equalised in zip(faces, out, strict=True):
        np.testing.assert_array_equal(equalised, cv2.equalizeHist(face))
        # What the service feeds for a detected face with the card's `equalize` (no padding).
        served = crop_face(face, whole_image_box(face), FaceCropSpec(padding=0.0, equalize=True),
                           48)
        np.testing.assert_array_equal(equalised, served)


def test_a_share_of_the_faces_is_equalised_and_the_input_is_left_alone(faces):
    many = np.concatenate([faces] * 8)
    before = many.copy()
    p = 0.3
    out = equalize_randomly(many, p, seeded(1))
    np.testing.assert_array_equal(many, before)
    equalised = np.array([np.array_equal(o, cv2.equalizeHist(f)) and not np.array_equal(o, f)
                          for o, f in zip(out, many, strict=True)])
    untouched = np.array([np.array_equal(o, f) for o, f in zip(out, many, strict=True)])
    assert (equalised | untouched).all()
    n = len(many)
    assert abs(equalised.sum() - p * n) < 4 * math.sqrt(n * p * (1 - p)), equalised.sum()
    np.testing.assert_array_equal(out, equalize_randomly(many, p, seeded(1)))


@pytest.mark.parametrize("option", ["equalize_p", "erase_p"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_a_probability_outside_0_to_1_is_refused(option, value):
    with pytest.raises(ValueError, match=option):
        AugmentConfig(**{option: value})

