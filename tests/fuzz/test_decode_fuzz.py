"""Fuzzing the untrusted-bytes path: decode -> detect -> crop -> normalise.

Whatever the bytes (random, or real JPEG/PNG/WebP/BMP files with bits flipped, bytes
overwritten or cut, chunks deleted or repeated, header fields such as the dimensions set
to extreme values), decoding (in full, as `decode_grayscale`, or JPEGs at a reduced
size, as the pipeline asks `decode` for) either returns a 2-D uint8 image within the
pixel limit or raises `ImageError`; detection and cropping then work on what it
returned, and every box maps back inside the image's own size. Anything else (another
exception, a crash, a hang) is a bug.

The default suite runs a few hundred cases; `FUZZ_EXAMPLES=20000 pytest tests/fuzz`
runs longer.
"""

from __future__ import annotations

import os
import struct
import time
from functools import cache

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.card import FaceCropSpec, InputSpec
from service.detector import DetectorConfig, FaceDetector
from service.imaging import ImageError, decode, decode_grayscale, dimensions, sniff_format
from service.preprocess import crop_face, normalize, whole_image_box
from tests.conftest import photo

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
MAX_PIXELS = 4_000_000
SLOW_S = 10.0  # one case taking this long counts as a hang

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

INTERESTING = [0, 1, 2, 7, 8, 16, 127, 128, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0x3FFF, 0xFFFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


@cache
def detector() -> FaceDetector:
    return FaceDetector(DetectorConfig(border=0.1))


@cache
def seeds() -> dict[str, bytes]:
    """Small real images in every accepted format and flavour, and the full photo."""
    image = cv2.imdecode(np.frombuffer(photo(), np.uint8), cv2.IMREAD_COLOR)
    small = cv2.resize(image, (80, 64), interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    bgra = cv2.cvtColor(small, cv2.COLOR_BGR2BGRA)

    def encode(ext: str, pixels: np.ndarray, params: list[int] | None = None) -> bytes:
        ok, data = cv2.imencode(ext, pixels, params or [])
        assert ok
        return data.tobytes()

    animation = cv2.Animation()
    animation.frames = [small, cv2.flip(small, 1), small // 2]
    animation.durations = [100, 100, 100]

    def animated(ext: str) -> bytes:
        ok, data = cv2.imencodeanimation(ext, animation)
        assert ok
        return bytes(data)

    wide = cv2.resize(image, (400, 240), interpolation=cv2.INTER_AREA)  # decoded at 1/2..1/8
    return {
        "jpeg": encode(".jpg", small),
        "jpeg-wide": encode(".jpg", wide),
        "jpeg-wide-exif-rotated": with_exif_orientation(encode(".jpg", wide), 6),
        "jpeg-progressive": encode(".jpg", small, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        "jpeg-gray": encode(".jpg", gray),
        "jpeg-photo": photo(),
        "png": encode(".png", small),
        "png-gray": encode(".png", gray),
        "png-alpha": encode(".png", bgra),
        "webp": encode(".webp", small),
        "webp-lossless": encode(".webp", small, [cv2.IMWRITE_WEBP_QUALITY, 101]),
        "png-animated": animated(".png"),
        "webp-animated": animated(".webp"),
        "bmp": encode(".bmp", small),
        "bmp-gray": encode(".bmp", gray),
    }


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 Exif segment whose only tag is Orientation (6: turn 90 degrees)."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + bytes(4)
    exif = b"Exif\x00\x00" + b"MM\x00*" + struct.pack(">I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + jpeg[2:]


def header_fields(data: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of the header fields that say how big and what kind."""
    fmt = sniff_format(data)
    if fmt == "jpeg":
        fields = []
        for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc4", b"\xff\xda", b"\xff\xdb"):
            at = data.find(marker)
            if at >= 0:  # segment length, then (for SOF) precision, height, width, components
                fields += [(at + 2, ">H"), (at + 4, "B"), (at + 5, ">H"), (at + 7, ">H"),
                           (at + 9, "B")]
        return fields
    if fmt == "png":
        fields = [(8, ">I"), (16, ">I"), (20, ">I"), (24, "B"), (25, "B"), (26, "B"), (28, "B")]
        for chunk in (b"acTL", b"fcTL"):  # APNG: frame count; a frame's size and offset
            at = data.find(chunk, 8)
            if at >= 0:
                fields += [(at + 4, ">I"), (at + 8, ">I"), (at + 12, ">I"), (at + 16, ">I"),
                           (at + 20, ">I")]
        return fields
    if fmt == "bmp":
        return [(2, "<I"), (10, "<I"), (14, "<I"), (18, "<i"), (22, "<i"), (26, "<H"), (28, "<H"),
                (30, "<I"), (34, "<I"), (46, "<I")]
    if fmt == "webp":
        fields = [(4, "<I"), (16, "<I"), (21, "<I"), (24, "<I"), (26, "<H"), (27, "<I"), (28, "<H")]
        at = data.find(b"ANMF")  # an animation frame: its offset and size (3 bytes each)
        if at >= 0:
            fields += [(at + 4, "<I"), (at + 8, "<I"), (at + 11, "<I"), (at + 14, "<I")]
        return fields
    return []


def set_field(data: bytearray, offset: int, layout: str, value: int) -> None:
    size = struct.calcsize(layout)
    if offset + size > len(data):
        return
    bits = size * 8
    value %= 1 << bits
    if layout[-1].islower():  # signed
        value = value - (1 << bits) if value >= 1 << (bits - 1) else value
    struct.pack_into(layout, data, offset, value)


def position(data: bytes | bytearray, fraction: float) -> int:
    return min(int(fraction * len(data)), max(len(data) - 1, 0))


mutation = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.just("byte"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("field"), st.integers(0, 15),
              st.sampled_from(INTERESTING) | st.integers(0, 2**32 - 1)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 64)),
    st.tuples(st.just("repeat"), st.floats(0, 1), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=32)),
)


def mutate(seed: bytes, mutations: list[tuple]) -> bytes:
    data = bytearray(seed)
    for kind, *args in mutations:
        if not data:
            break
        if kind == "flip":
            data[position(data, args[0])] ^= 1 << args[1]
        elif kind == "byte":
            data[position(data, args[0])] = args[1]
        elif kind == "truncate":
            del data[position(data, args[0]):]
        elif kind == "field":
            fields = header_fields(bytes(data))
            if fields:
                offset, layout = fields[args[0] % len(fields)]
                set_field(data, offset, layout, args[1])
        elif kind == "delete":
            at = position(data, args[0])
            del data[at : at + args[1]]
        elif kind == "repeat":
            at = position(data, args[0])
            data[at:at] = data[at : at + args[1]]
        elif kind == "insert":
            at = position(data, args[0])
            data[at:at] = args[1]
    return bytes(data)


MIN_SIDES = [None, 48, 100, 640]  # None: decode in full; else JPEGs may be decoded smaller


def check_untrusted(data: bytes, min_side: int | None = None) -> None:
    """The whole path a request's bytes take; only ImageError may come out."""
    started = time.perf_counter()
    try:
        image = decode(data, MAX_PIXELS, min_side)
    except ImageError as error:
        assert 400 <= error.status < 500 and error.code and error.message
        return
    finally:
        assert time.perf_counter() - started < SLOW_S, f"decoding {len(data)} bytes hung"
    gray = image.gray
    assert isinstance(gray, np.ndarray) and gray.dtype == np.uint8 and gray.ndim == 2
    height, width = gray.shape
    assert 0 < width * height <= MAX_PIXELS
    assert 0 < image.width * image.height <= MAX_PIXELS
    if min_side is None:
        assert (image.width, image.height) == (width, height)
    boxes = detector().detect(gray)
    crop, spec = FaceCropSpec(padding=0.2, equalize=True), InputSpec(mean=0.5, std=0.25)
    for box in [*boxes, whole_image_box(gray)]:
        assert box.width >= 1 and box.height >= 1
        assert 0 <= box.x and box.x + box.width <= width
        assert 0 <= box.y and box.y + box.height <= height
        original = image.to_original(box)
        assert original.width >= 1 and original.height >= 1
        assert 0 <= original.x and original.x + original.width <= image.width
        assert 0 <= original.y and original.y + original.height <= image.height
        face = crop_face(gray, box, crop, spec.size)
        assert face.shape == (spec.size, spec.size) and face.dtype == np.uint8
        batch = normalize(face[None], spec)
        assert batch.shape == (1, 1, spec.size, spec.size) and np.isfinite(batch).all()
    assert time.perf_counter() - started < SLOW_S * 3, "detect/crop hung"


def test_every_seed_decodes_cleanly() -> None:
    for name, data in seeds().items():
        gray = decode_grayscale(data, MAX_PIXELS)
        assert gray.ndim == 2, name
        expected = {"jpeg-wide": (240, 400), "jpeg-wide-exif-rotated": (400, 240),
                    "jpeg-photo": (350, 350)}.get(name, (64, 80))
        assert gray.shape == expected, name
        for min_side in MIN_SIDES:
            check_untrusted(data, min_side)


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from(MIN_SIDES))
def test_arbitrary_bytes(data: bytes, min_side: int | None) -> None:
    check_untrusted(data, min_side)


MAGIC = [b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"\x89PNG\r\n\x1a\n",
         b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
         b"RIFF\x00\x00\x00\x00WEBPVP8L", b"RIFF\x00\x00\x00\x00WEBPVP8X", b"BM"]


@FUZZ
@given(st.sampled_from(MAGIC), st.binary(max_size=2048), st.sampled_from(MIN_SIDES))
def test_magic_bytes_then_garbage(magic: bytes, rest: bytes, min_side: int | None) -> None:
    check_untrusted(magic + rest, min_side)


@FUZZ
@given(st.sampled_from(sorted(seeds())), st.lists(mutation, min_size=1, max_size=4),
       st.sampled_from(MIN_SIDES))
def test_mutated_real_images(seed: str, mutations: list[tuple], min_side: int | None) -> None:
    check_untrusted(mutate(seeds()[seed], mutations), min_side)


@FUZZ
@given(st.sampled_from(sorted(seeds())), st.integers(0, 15), st.sampled_from(INTERESTING),
       st.sampled_from(MIN_SIDES))
def test_extreme_header_fields(seed: str, field: int, value: int, min_side: int | None) -> None:
    check_untrusted(mutate(seeds()[seed], [("field", field, value)]), min_side)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "bmp"])
@FUZZ
@given(data=st.binary(max_size=64))
def test_header_readers_refuse_short_or_odd_headers_with_image_error(fmt: str, data: bytes) -> None:
    try:
        width, height = dimensions(data, fmt)
    except ImageError:
        return
    assert width > 0 and height > 0
