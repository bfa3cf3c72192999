import struct
import zlib

import cv2
import numpy as np
import pytest

from service.imaging import ImageError, decode_grayscale, dimensions, sniff_format
from tests.conftest import photo


def encoded(fmt: str, width: int = 64, height: int = 40) -> bytes:
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, data = cv2.imencode(f".{fmt}", image)
    assert ok
    return data.tobytes()


@pytest.mark.parametrize("fmt,name", [("jpg", "jpeg"), ("png", "png"), ("webp", "webp"),
                                      ("bmp", "bmp")])
def test_every_supported_format_is_sniffed_measured_and_decoded(fmt, name):
    data = encoded(fmt)
    assert sniff_format(data) == name
    assert dimensions(data, name) == (64, 40)
    gray = decode_grayscale(data, max_pixels=10_000)
    assert gray.shape == (40, 64) and gray.ndim == 2


def test_lossless_webp_header_is_read():
    image = np.zeros((33, 17, 3), np.uint8)
    ok, data = cv2.imencode(".webp", image, [cv2.IMWRITE_WEBP_QUALITY, 101])
    assert ok and dimensions(data.tobytes(), "webp") == (17, 33)


def png_header_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00" * 64 + b"IEND"


def test_decompression_bomb_is_refused_from_the_header():
    with pytest.raises(ImageError) as caught:
        decode_grayscale(png_header_claiming(50_000, 50_000), max_pixels=40_000_000)
    assert caught.value.status == 413 and caught.value.code == "too_many_pixels"


@pytest.mark.parametrize(
    "data,status,code",
    [
        (b"", 400, "empty_body"),
        (b"hello, I am not an image", 415, "unsupported_media_type"),
        (b"GIF89a" + b"\x00" * 20, 415, "unsupported_media_type"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 10, 400, "corrupt_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "corrupt_image"),
    ],
)
def test_bad_bytes_get_a_client_error(data, status, code):
    with pytest.raises(ImageError) as caught:
        decode_grayscale(data, max_pixels=40_000_000)
    assert (caught.value.status, caught.value.code) == (status, code)


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_truncated_photo_is_refused(cut):
    data = photo()
    with pytest.raises(ImageError) as caught:
        decode_grayscale(data[: int(len(data) * cut)], max_pixels=40_000_000)
    assert caught.value.status == 400


def test_truncated_png_is_refused():
    data = encoded("png", 200, 200)
    with pytest.raises(ImageError):
        decode_grayscale(data[: len(data) // 2], max_pixels=40_000_000)


def test_real_photo_decodes_to_its_size():
    assert decode_grayscale(photo(), max_pixels=40_000_000).shape == (350, 350)
