"""Shared by the /v2 tests: real face crops and photos, and /predict's answers for them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import cv2
import numpy as np

from service.card import CLASSES, InputSpec
from service.preprocess import normalize
from tests.conftest import FACES, FER_MINI


def fer_faces(count: int = 8) -> list[Path]:
    """48x48 FER2013 faces, one class after another."""
    paths = sorted(FER_MINI.glob("validation/*/*.png"))
    return paths[:: max(1, len(paths) // count)][:count]


def crops_for(paths: list[Path], mean: float, std: float) -> np.ndarray:
    """The crops as `input` wants them, normalised as the model's metadata says."""
    gray = np.stack([cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) for path in paths])
    return normalize(gray, InputSpec(mean=mean, std=std))


def photos(count: int = 3) -> list[bytes]:
    return [path.read_bytes() for path in sorted(FACES.glob("*/*.jpg"))[:count]]


def blank_png() -> bytes:
    return cv2.imencode(".png", np.full((120, 160), 90, np.uint8))[1].tobytes()


def predicted_probabilities(response_json: dict) -> np.ndarray:
    return np.array([[face["probabilities"][name] for name in CLASSES]
                     for face in response_json["faces"]], dtype=np.float64).reshape(-1, 7)


def predicted_boxes(response_json: dict) -> np.ndarray:
    return np.array([[face["box"][k] for k in ("x", "y", "width", "height")]
                     for face in response_json["faces"]], dtype=np.int64).reshape(-1, 4)


def binary_request(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    """A body in Triton's binary tensor extension, and its headers."""
    text = json.dumps(header).encode()
    return text + b"".join(blobs), {"Inference-Header-Content-Length": str(len(text)),
                                    "content-type": "application/octet-stream"}


def split_binary_response(body: bytes, header_length: int) -> tuple[dict, dict[str, bytes]]:
    """The JSON part of a binary response, and each binary output's bytes by name."""
    document = json.loads(body[:header_length])
    blobs, offset = {}, header_length
    for output in document["outputs"]:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            blobs[output["name"]] = body[offset : offset + size]
            offset += size
    assert offset == len(body)
    return document, blobs


def length_prefixed(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)
