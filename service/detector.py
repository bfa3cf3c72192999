"""Face detectors: OpenCV's frontal-face Haar cascade (here, the default) and RetinaFace
(`service/retinaface.py`), behind one small protocol, chosen in one place (`create_detector`).

`cv2.CascadeClassifier.detectMultiScale` is not safe to call from several threads on
one classifier (it asserts in `getScaleData`), so every thread gets its own.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np

from service.preprocess import Box
from service.retinaface import RetinaFaceConfig, RetinaFaceDetector

DetectorName = Literal["haar", "retinaface"]

CASCADE_DIR = Path(cv2.data.haarcascades)
CASCADE_PATH = CASCADE_DIR / "haarcascade_frontalface_default.xml"
# The eps `detectMultiScale` groups its raw windows with (OpenCV's GROUP_EPS).
GROUP_EPS = 0.2
# Raw windows under this fraction of a face's side do not group with that face's windows
# (on natural-dev, searching from it finds the same boxes as a full search in 299 of 300).
GROUPING_REACH = 0.5


def cascade_path(cascade: str) -> Path:
    """A cascade OpenCV ships, by the short name of its frontal-face file (`default`,
    `alt`, `alt2`, `alt_tree`), or the path of a cascade XML file."""
    shipped = CASCADE_DIR / f"haarcascade_frontalface_{cascade}.xml"
    return shipped if shipped.is_file() else Path(cascade)


@dataclass(frozen=True)
class DetectorConfig:
    """The Haar plan. The defaults were chosen with `python -m bench.detectors haar` on
    natural-dev and its 1280x720 frames (bench/DETECTORS.md): against the former plan
    (side 320, min_neighbors 5, equalised), as many faces or more at a third of the CPU."""

    # OpenCV's frontal-face cascade (`cascade_path`): `default` is the one the papers and
    # `fer` use; `alt2` searches in about 70 % of its time and finds a few faces fewer.
    cascade: str = "default"
    max_side: int = 160
    scale_factor: float = 1.1
    min_neighbors: int = 3
    min_size: int = 24
    equalize: bool = False
    max_faces: int = 32
    # Haar cascades miss faces that fill the frame (they need context around the face):
    # a black border of this fraction of the longest side is added before searching.
    # `max_side` bounds the bordered image, so the border never adds search cost.
    border: float = 0.25
    # Faces under this fraction of the image's shorter side are searched on the image
    # without its border (a small face has its context around it), larger ones on the
    # bordered image: the finest pyramid levels, the costliest, then scan 1 / (1 + 2 x
    # border)^2 of the area. The raw windows of both searches are grouped together, as one
    # search groups its own. 0 = one search of the bordered image at every size.
    border_min_face: float = 0.6
    # With that split, the large faces are searched first. Then windows from half the
    # largest one's side search the whole image (they group with its windows), and
    # smaller ones only the strips beside it where a `min_size` face fits: none in most
    # close-ups, a third of detection's cost saved there. False = the whole image for all.
    room_check: bool = True
    # A second search, only of images in which the first found nothing, with these
    # settings in place of the first's (0 = no second pass): finer, for smaller faces.
    fallback_max_side: int = 240
    fallback_border: float = 0.25
    fallback_min_neighbors: int = 3


class FaceDetector:
    def __init__(self, config: DetectorConfig = DetectorConfig(), cascade: Path | None = None):
        cascade = cascade or cascade_path(config.cascade)
        if not cascade.is_file():
            shipped = sorted(p.stem.removeprefix("haarcascade_frontalface_")
                             for p in CASCADE_DIR.glob("haarcascade_frontalface_*.xml"))
            raise FileNotFoundError(f"Haar cascade not found: {cascade} (FER_HAAR_CASCADE: "
                                    f"one of {', '.join(shipped)}, or a cascade XML file)")
        self.config = config
        self.cascade_path = str(cascade)
        self._local = threading.local()
        self._classifier()  # fail at start-up, not on the first request

    def _classifier(self) -> cv2.CascadeClassifier:
        classifier = getattr(self._local, "classifier", None)
        if classifier is None:
            try:
                classifier = cv2.CascadeClassifier(self.cascade_path)
            except (cv2.error, SystemError) as error:  # an XML file that is not a cascade
                raise RuntimeError(f"could not load Haar cascade {self.cascade_path}: "
                                   f"{error}") from None
            if classifier.empty():
                raise RuntimeError(f"could not load Haar cascade {self.cascade_path}")
            self._local.classifier = classifier
        return classifier

    def detect(self, gray: np.ndarray) -> list[Box]:
        """Boxes in `gray`'s own coordinates, largest first, at most `max_faces`."""
        c = self.config
        boxes = self._search(gray, c.max_side, c.border, c.min_neighbors)
        if not boxes and c.fallback_max_side:
            boxes = self._search(gray, c.fallback_max_side, c.fallback_border,
                                 c.fallback_min_neighbors)
        return boxes

    def decode_side(self, crop_size: int) -> int:
        """The longest side an image must keep when decoded: detection works at `max_side`;
        beyond that, the smallest face it can find (`min_size` there) must still cover
        a `crop_size` crop, so no crop is upscaled that a full decode would have shrunk."""
        c = self.config
        return math.ceil(max(c.max_side, c.fallback_max_side) * max(1.0, crop_size / c.min_size))

    def _search(self, gray: np.ndarray, max_side: int, border: float,
                min_neighbors: int) -> list[Box]:
        c = self.config
        height, width = gray.shape
        scale = min(1.0, max_side / (max(height, width) * (1 + 2 * border)))
        small = gray
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        if c.equalize:
            small = cv2.equalizeHist(small)
        pad = round(border * max(small.shape))
        split = round(c.border_min_face * min(small.shape))
        if pad and split > c.min_size:
            found = self._split_search(small, pad, split, min_neighbors)
        else:
            if pad:
                small = cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_CONSTANT,
                                           value=0)
            found = np.asarray(self._classifier().detectMultiScale(
                small, scaleFactor=c.scale_factor, minNeighbors=min_neighbors,
                minSize=(c.min_size, c.min_size)), dtype=np.int64).reshape(-1, 4) - [pad, pad, 0, 0]
        boxes = []
        for x, y, w, h in found:
            x0, y0 = max(round(x / scale), 0), max(round(y / scale), 0)
            x1, y1 = min(round((x + w) / scale), width), min(round((y + h) / scale), height)
            if x1 - x0 >= 2 and y1 - y0 >= 2:
                boxes.append(Box(x0, y0, x1 - x0, y1 - y0))
        boxes.sort(key=lambda box: (-box.area, box.y, box.x))
        return boxes[: c.max_faces]

    def _split_search(self, small: np.ndarray, pad: int, split: int,
                      min_neighbors: int) -> np.ndarray:
        """`border_min_face`'s two searches: windows from `split` px up on `small` with its
        border, then smaller ones on `small` (where `room_check` leaves them to search),
        grouped together. Boxes in `small`'s coordinates."""
        c = self.config
        classifier = self._classifier()
        bordered = cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        # minNeighbors=0: the raw windows, ungrouped.
        coarse = np.asarray(classifier.detectMultiScale(
            bordered, scaleFactor=c.scale_factor, minNeighbors=0, minSize=(split, split)),
            dtype=np.int64).reshape(-1, 4) - [pad, pad, 0, 0]
        # (region, smallest window, largest window) still to search under `split`.
        searches = [((0, 0, small.shape[1], small.shape[0]), c.min_size, split - 1)]
        if c.room_check:
            searches = self._beside_largest(coarse, small.shape, min_neighbors, split)
        found = [np.asarray(classifier.detectMultiScale(
            small[y0:y1, x0:x1], scaleFactor=c.scale_factor, minNeighbors=0,
            minSize=(smallest, smallest), maxSize=(largest, largest)),
            dtype=np.int64).reshape(-1, 4) + [x0, y0, 0, 0]
            for (x0, y0, x1, y1), smallest, largest in searches
            if smallest <= largest and min(x1 - x0, y1 - y0) >= smallest]
        fine = np.concatenate(found) if found else np.empty((0, 4), dtype=np.int64)
        windows = np.concatenate([fine, coarse])
        if not len(windows):
            return windows
        grouped, _ = cv2.groupRectangles(windows.tolist(), min_neighbors, GROUP_EPS)
        return np.asarray(grouped, dtype=np.int64).reshape(-1, 4)

    def _beside_largest(self, windows: np.ndarray, shape: tuple[int, int],
                        min_neighbors: int, split: int) -> list[tuple[tuple[int, ...], int, int]]:
        """Where the search for faces under the split still has to look, and from which
        window size: everywhere for the windows that can group with the largest face
        among `windows`' (from `GROUPING_REACH` of its side), and smaller ones only in
        the strips beside it (left and right, or above and below) wide enough for a
        `min_size` face that overlaps it by at most half its own side."""
        c = self.config
        height, width = shape
        everywhere = (0, 0, width, height)
        grouped = ()
        if len(windows) > min_neighbors:
            grouped, _ = cv2.groupRectangles(windows.tolist(), min_neighbors, GROUP_EPS)
        if not len(grouped):
            return [(everywhere, c.min_size, split - 1)]
        x, y, w, h = (int(v) for v in max(grouped, key=lambda box: box[2] * box[3]))
        # Windows from `split` up are the bordered search's, whatever the face's size.
        near = min(math.ceil(GROUPING_REACH * min(w, h)), split)
        if near <= c.min_size:
            return [(everywhere, c.min_size, split - 1)]
        overlap = c.min_size // 2
        left, right = min(width, max(0, x + overlap)), max(0, min(width, x + w - overlap))
        top, bottom = min(height, max(0, y + overlap)), max(0, min(height, y + h - overlap))
        columns = [s for s in ((0, 0, left, height), (right, 0, width, height))
                   if s[2] - s[0] >= c.min_size]
        rows = [s for s in ((0, 0, width, top), (0, bottom, width, height))
                if s[3] - s[1] >= c.min_size]
        if columns and rows:  # strips that cross would find their corners twice
            return [(everywhere, c.min_size, split - 1)]
        return [(everywhere, near, split - 1)] + [(strip, c.min_size, near - 1)
                                                   for strip in columns + rows]


class Detector(Protocol):
    """What the pipeline needs of a detector; nothing downstream asks which one it is."""

    def detect(self, gray: np.ndarray) -> list[Box]:
        """Faces in `gray`'s coordinates, largest first (`Detection`s with landmarks
        from detectors that give them)."""
        ...

    def decode_side(self, crop_size: int) -> int:
        """The longest side an image must keep when decoded for this detector."""
        ...


def create_detector(name: DetectorName, haar: DetectorConfig = DetectorConfig(),
                    retinaface: RetinaFaceConfig | None = None,
                    providers: list[str] | None = None) -> Detector:
    """The detector `FER_DETECTOR` names, loaded now: a missing or broken model raises here,
    at start-up, not on the first request."""
    if name == "haar":
        return FaceDetector(haar)
    if name == "retinaface":
        return RetinaFaceDetector(retinaface or RetinaFaceConfig(), providers)
    raise ValueError(f"unknown detector {name!r}: expected 'haar' or 'retinaface'")
