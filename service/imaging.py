"""Untrusted image bytes -> grayscale pixels, refusing what should not be decoded.

The format is taken from the magic bytes (never from the client's content type), and
the pixel count is read from the header so a decompression bomb is refused before
any pixel is decoded.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

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


def decode_grayscale(data: bytes, max_pixels: int) -> np.ndarray:
    """Check, then decode, an uploaded image to a 2-D uint8 array (EXIF orientation applied)."""
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
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
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
