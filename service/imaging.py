"""Untrusted image bytes -> grayscale pixels, refusing what should not be decoded.

The format is taken from the magic bytes (never from the client's content type), and
the pixel count is read from the header so a decompression bomb is refused before
any pixel is decoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

from service.preprocess import Box

SUPPORTED_FORMATS = ("jpeg", "png", "webp", "bmp")
MEDIA_TYPES = {f"image/{fmt}": fmt for fmt in SUPPORTED_FORMATS} | {"image/jpg": "jpeg"}


class ImageError(ValueError):
    """The bytes are not an image this service accepts; `status` is the HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def sniff_format(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    return None


def dimensions(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from the header alone."""
    try:
        size = _HEADER_READERS[fmt](data)
    except (struct.error, IndexError):
        size = None
    if size is None or size[0] <= 0 or size[1] <= 0:
        raise ImageError(400, "corrupt_image", f"the {fmt} header is truncated or corrupt")
    return size


@dataclass(frozen=True, slots=True)
class Decoded:
    """An image's grayscale pixels, possibly decoded at a fraction of its size.

    `width` and `height` are the image's own size (EXIF orientation applied) whatever
    `gray` holds; `to_original` maps a box found in `gray` back to them.
    """

    gray: np.ndarray
    width: int
    height: int

    @property
    def reduced(self) -> bool:
        return self.gray.shape != (self.height, self.width)

    def to_original(self, box: Box) -> Box:
        if not self.reduced:
            return box
        sx, sy = self.width / self.gray.shape[1], self.height / self.gray.shape[0]
        x0, y0 = min(round(box.x * sx), self.width - 1), min(round(box.y * sy), self.height - 1)
        x1 = min(max(round((box.x + box.width) * sx), x0 + 1), self.width)
        y1 = min(max(round((box.y + box.height) * sy), y0 + 1), self.height)
        return Box(x0, y0, x1 - x0, y1 - y0)


_REDUCED = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
            (2, cv2.IMREAD_REDUCED_GRAYSCALE_2))


def decode(data: bytes, max_pixels: int, min_side: int | None = None) -> Decoded:
    """Check, then decode, an uploaded image to grayscale (EXIF orientation applied).

    With `min_side`, a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg scales
    in the DCT, so this is much cheaper than decoding in full and shrinking) when its
    longest side stays at least `min_side`: the caller says how many pixels it needs.
    """
    fmt, width, height = _check(data, max_pixels)
    flag, factor = cv2.IMREAD_GRAYSCALE, 1
    if min_side is not None and fmt == "jpeg":
        for k, reduced_flag in _REDUCED:
            if -(-max(width, height) // k) >= min_side:
                flag, factor = reduced_flag, k
                break
    image = _imdecode(data, fmt, flag)
    if factor > 1:
        # libjpeg's scaled size is ceil(side / k); EXIF orientation may swap the axes.
        expected = (-(-height // factor), -(-width // factor))
        if image.shape == expected:
            return Decoded(image, width, height)
        if image.shape == expected[::-1]:
            return Decoded(image, height, width)
        image = _imdecode(data, fmt, cv2.IMREAD_GRAYSCALE)  # header and pixels disagree
    return Decoded(image, int(image.shape[1]), int(image.shape[0]))


def decode_grayscale(data: bytes, max_pixels: int) -> np.ndarray:
    """Check, then decode, an uploaded image to a 2-D uint8 array (EXIF orientation applied)."""
    return decode(data, max_pixels).gray


def _check(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """The format and header size of acceptable image bytes; raises `ImageError` otherwise."""
    if not data:
        raise ImageError(400, "empty_body", "the request carried no image bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(
            415,
            "unsupported_media_type",
            f"not a supported image: expected one of {', '.join(SUPPORTED_FORMATS)}",
        )
    width, height = dimensions(data, fmt)
    if width * height > max_pixels:
        raise ImageError(
            413,
            "too_many_pixels",
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        )
    if not _looks_complete(data, fmt):
        raise ImageError(400, "corrupt_image", f"the {fmt} data is truncated")
    return fmt, width, height


def _imdecode(data: bytes, fmt: str, flag: int) -> np.ndarray:
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    except cv2.error:  # OpenCV's own checks (its size limit, an allocation) raise, not return None
        image = None
    if image is None or image.size == 0:
        raise ImageError(400, "corrupt_image", f"the {fmt} data could not be decoded")
    return image


def _looks_complete(data: bytes, fmt: str) -> bool:
    """Decoders fill a truncated image with grey instead of failing: catch that first."""
    if fmt == "jpeg":
        start_of_scan = data.find(b"\xff\xda")
        return start_of_scan > 0 and data.rfind(b"\xff\xd9") > start_of_scan
    if fmt == "png":
        return data.rfind(b"IEND") > 8
    if fmt == "bmp":
        declared = struct.unpack_from("<I", data, 2)[0]  # 0 is allowed: "size unknown"
        return len(data) >= declared
    return True


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            offset += 2
            continue
        length = struct.unpack_from(">H", data, offset + 2)[0]
        if length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack_from(">HH", data, offset + 5)
            return width, height
        offset += 2 + length
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR":
        return None
    return struct.unpack_from(">II", data, 16)


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    header_size = struct.unpack_from("<I", data, 14)[0]
    if header_size == 12:
        return struct.unpack_from("<HH", data, 18)
    width, height = struct.unpack_from("<ii", data, 18)
    return width, abs(height)


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = struct.unpack_from("<I", data, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


_HEADER_READERS = {"jpeg": _jpeg_size, "png": _png_size, "bmp": _bmp_size, "webp": _webp_size}
