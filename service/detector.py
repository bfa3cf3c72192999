"""Face boxes from OpenCV's frontal-face Haar cascade.

`cv2.CascadeClassifier.detectMultiScale` is not safe to call from several threads on
one classifier (it asserts in `getScaleData`), so every thread gets its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from service.preprocess import Box

CASCADE_PATH = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"


@dataclass(frozen=True)
class DetectorConfig:
    max_side: int = 320
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 24
    equalize: bool = True
    max_faces: int = 32
    # Haar cascades miss faces that fill the frame (they need context around the face):
    # a black border of this fraction of the longest side is added before searching.
    # `max_side` bounds the bordered image, so the border never adds search cost.
    border: float = 0.25


class FaceDetector:
    def __init__(self, config: DetectorConfig = DetectorConfig(), cascade: Path = CASCADE_PATH):
        if not cascade.is_file():
            raise FileNotFoundError(f"Haar cascade not found: {cascade}")
        self.config = config
        self.cascade_path = str(cascade)
        self._local = threading.local()
        self._classifier()  # fail at start-up, not on the first request

    def _classifier(self) -> cv2.CascadeClassifier:
        classifier = getattr(self._local, "classifier", None)
        if classifier is None:
            classifier = cv2.CascadeClassifier(self.cascade_path)
            if classifier.empty():
                raise RuntimeError(f"could not load Haar cascade {self.cascade_path}")
            self._local.classifier = classifier
        return classifier

    def detect(self, gray: np.ndarray) -> list[Box]:
        """Boxes in `gray`'s own coordinates, largest first, at most `max_faces`."""
        c = self.config
        height, width = gray.shape
        scale = min(1.0, c.max_side / (max(height, width) * (1 + 2 * c.border)))
        small = gray
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        if c.equalize:
            small = cv2.equalizeHist(small)
        pad = round(c.border * max(small.shape))
        if pad:
            small = cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        found = self._classifier().detectMultiScale(
            small,
            scaleFactor=c.scale_factor,
            minNeighbors=c.min_neighbors,
            minSize=(c.min_size, c.min_size),
        )
        boxes = []
        for x, y, w, h in np.asarray(found, dtype=np.int64).reshape(-1, 4) - [pad, pad, 0, 0]:
            x0, y0 = max(round(x / scale), 0), max(round(y / scale), 0)
            x1, y1 = min(round((x + w) / scale), width), min(round((y + h) / scale), height)
            if x1 - x0 >= 2 and y1 - y0 >= 2:
                boxes.append(Box(x0, y0, x1 - x0, y1 - y0))
        boxes.sort(key=lambda box: (-box.area, box.y, box.x))
        return boxes[: c.max_faces]
