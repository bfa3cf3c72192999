import numpy as np
import pytest

from service.card import FaceCropSpec, InputSpec
from service.preprocess import Box, crop_face, normalize, softmax, to_grayscale


def gradient(height: int = 100, width: int = 120) -> np.ndarray:
    return (np.arange(height * width) % 256).astype(np.uint8).reshape(height, width)


def test_crop_is_square_uint8_of_the_requested_size():
    crop = crop_face(gradient(), Box(10, 20, 40, 30), FaceCropSpec(), 48)
    assert crop.shape == (48, 48) and crop.dtype == np.uint8


def test_crop_without_padding_equals_the_resized_box():
    image = np.zeros((100, 100), np.uint8)
    image[10:58, 20:68] = 200
    crop = crop_face(image, Box(20, 10, 48, 48), FaceCropSpec(), 48)
    assert (crop == 200).all()


def test_padding_beyond_the_image_replicates_the_border():
    image = np.full((50, 50), 7, np.uint8)
    crop = crop_face(image, Box(0, 0, 50, 50), FaceCropSpec(padding=0.5), 48)
    assert (crop == 7).all()


def test_box_outside_the_image_is_refused():
    with pytest.raises(ValueError, match="outside"):
        crop_face(gradient(), Box(500, 500, 10, 10), FaceCropSpec(), 48)


def test_equalize_stretches_contrast():
    image = np.tile(np.linspace(100, 120, 48).astype(np.uint8), (48, 1))
    flat = crop_face(image, Box(0, 0, 48, 48), FaceCropSpec(), 48)
    stretched = crop_face(image, Box(0, 0, 48, 48), FaceCropSpec(equalize=True), 48)
    assert np.ptp(stretched) > np.ptp(flat)


def test_normalize_scales_and_adds_the_channel_axis():
    spec = InputSpec(mean=0.5, std=0.25)
    out = normalize(np.array([[[0, 255]]], np.uint8), spec)
    assert out.shape == (1, 1, 1, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [-2.0, 2.0], atol=1e-6)


def test_softmax_rows_sum_to_one_even_for_large_logits():
    out = softmax(np.array([[1000.0, 0.0, -1000.0]]))
    np.testing.assert_allclose(out.sum(-1), 1.0)


def test_grayscale_accepts_gray_bgr_and_bgra():
    assert to_grayscale(np.zeros((4, 4), np.uint8)).shape == (4, 4)
    assert to_grayscale(np.zeros((4, 4, 3), np.uint8)).shape == (4, 4)
    assert to_grayscale(np.zeros((4, 4, 4), np.uint8)).shape == (4, 4)
