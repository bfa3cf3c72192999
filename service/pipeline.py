"""Image bytes -> faces with expressions: the path shared by /predict and /v1/stream.

CPU work (decode, detect, crop, normalise) runs in a bounded thread pool; inference
goes through each model version's dynamic batcher. The event loop never blocks.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service import metrics
from service.batcher import BatcherPool, Overloaded
from service.card import CLASSES
from service.detector import Detector
from service.imaging import Decoded, decode
from service.model_store import Target
from service.preprocess import (
    WHOLE_IMAGE_CROP,
    Box,
    Detection,
    crop_face,
    normalize,
    softmax,
    whole_image_box,
)
from service.schemas import (
    Face,
    FaceBox,
    ImageSize,
    Landmarks,
    ModelRef,
    Point,
    PredictResponse,
    Probabilities,
    Timings,
)


@dataclass
class Prepared:
    width: int
    height: int
    boxes: list[Box]
    inputs: list[np.ndarray]  # one NCHW batch per target member
    decode_s: float
    detect_s: float
    preprocess_s: float


class Pipeline:
    def __init__(
        self,
        detector: Detector,
        batchers: BatcherPool,
        cpu_threads: int,
        max_pixels: int,
        max_inflight: int,
    ) -> None:
        self.detector = detector
        self.batchers = batchers
        self.max_pixels = max_pixels
        self.max_inflight = max_inflight
        self._inflight = 0
        self._executor = ThreadPoolExecutor(cpu_threads, thread_name_prefix="cpu")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def prepare(self, data: bytes, target: Target, detect: bool) -> Prepared:
        """Decode, find faces and build each member's input batch (runs in a worker thread)."""
        started = time.perf_counter()
        image = decode(data, self.max_pixels, self.pixels_needed(target, detect))
        gray = image.gray
        decoded = time.perf_counter()
        boxes = self.detector.detect(gray) if detect else [whole_image_box(gray)]
        detected = time.perf_counter()
        inputs = []
        # Ensemble members that crop and normalise alike share one batch.
        batches: dict[tuple[float, bool, bool, int, float, float], np.ndarray] = {}
        for model in target.members:
            card = model.card
            spec = card.face_crop if detect else WHOLE_IMAGE_CROP
            key = (spec.padding, spec.equalize, spec.align, card.input.size, card.input.mean,
                   card.input.std)
            if key not in batches:
                crops = [crop_face(gray, box, spec, card.input.size) for box in boxes]
                batches[key] = normalize(np.stack(crops), card.input) if crops else \
                    np.zeros((0, 1, card.input.size, card.input.size), np.float32)
            inputs.append(batches[key])
        finished = time.perf_counter()
        return Prepared(
            width=image.width, height=image.height,
            boxes=[to_original(image, box) for box in boxes], inputs=inputs,
            decode_s=decoded - started, detect_s=detected - decoded,
            preprocess_s=finished - detected,
        )

    def pixels_needed(self, target: Target, detect: bool) -> int:
        """The longest side an image must keep when decoded (JPEGs are decoded smaller):
        the detector's `decode_side` for the network input, so no crop is upscaled that a
        full decode would have downscaled."""
        crop = max(model.input_size for model in target.members)
        if not detect:
            return crop
        return self.detector.decode_side(crop)

    @property
    def inflight(self) -> int:
        return self._inflight

    def admit(self) -> None:
        """Raise `Overloaded` (503) while `max_inflight` images are in decode/detect."""
        if self._inflight >= self.max_inflight:
            metrics.REJECTED.labels(reason="too_many_inflight").inc()
            raise Overloaded(f"{self._inflight} images are already being processed")

    async def classify(self, target: Target, inputs: list[np.ndarray]) -> np.ndarray:
        """Probabilities [N, 7] of normalised faces (one batch per member, as `prepare` builds
        them), each member through its dynamic batcher; the ensemble's are their mean, at the
        ensemble's own temperature when it has one."""
        member_probabilities = await asyncio.gather(
            *(
                self.batchers.for_model(model).infer(batch)
                for model, batch in zip(target.members, inputs, strict=True)
            )
        )
        return combine_members(member_probabilities, target.temperature)

    async def predict(self, data: bytes, target: Target, detect: bool) -> PredictResponse:
        self.admit()
        started = time.perf_counter()
        self._inflight += 1
        try:
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self._executor, self.prepare, data, target,
                                                  detect)
        finally:
            self._inflight -= 1
        metrics.IMAGES.inc()
        metrics.FACES.inc(len(prepared.boxes))
        metrics.STAGE_LATENCY.labels(stage="decode").observe(prepared.decode_s)
        metrics.STAGE_LATENCY.labels(stage="detect").observe(prepared.detect_s)
        metrics.STAGE_LATENCY.labels(stage="preprocess").observe(prepared.preprocess_s)

        inference_started = time.perf_counter()
        probabilities = await self.classify(target, prepared.inputs) if prepared.boxes else []
        finished = time.perf_counter()
        metrics.STAGE_LATENCY.labels(stage="inference").observe(finished - inference_started)

        faces = [face_from(box, probs)
                 for box, probs in zip(prepared.boxes, probabilities, strict=True)]
        return PredictResponse(
            model=target.name,
            version=target.version,
            members=[ModelRef(name=m.name, version=m.version) for m in target.members]
            if target.is_ensemble else [],
            image=ImageSize(width=prepared.width, height=prepared.height),
            faces=faces,
            timings=Timings(
                decode_ms=round(prepared.decode_s * 1000, 2),
                detect_ms=round(prepared.detect_s * 1000, 2),
                preprocess_ms=round(prepared.preprocess_s * 1000, 2),
                inference_ms=round((finished - inference_started) * 1000, 2),
                total_ms=round((finished - started) * 1000, 2),
            ),
        )


def to_original(image: Decoded, box: Box) -> Box:
    """A face found in the (maybe reduced) decoded pixels, in the image's own pixels."""
    mapped = image.to_original(box)
    if not isinstance(box, Detection):
        return mapped
    landmarks = box.landmarks
    if landmarks is not None and image.reduced:
        sx, sy = image.width / image.gray.shape[1], image.height / image.gray.shape[0]
        landmarks = tuple((x * sx, y * sy) for x, y in landmarks)  # type: ignore[assignment]
    return Detection(mapped.x, mapped.y, mapped.width, mapped.height, score=box.score,
                     landmarks=landmarks)


def landmarks_of(box: Box) -> Landmarks | None:
    points = getattr(box, "landmarks", None)
    if points is None:
        return None
    return Landmarks(**{name: Point(x=round(x, 1), y=round(y, 1))
                        for name, (x, y) in zip(Landmarks.model_fields, points, strict=True)})


def combine_members(member_probabilities: list[np.ndarray], temperature: float = 1.0) -> np.ndarray:
    """Mean of the members' probabilities; a temperature other than 1 rescales its log
    (averaging calibrated members leaves the mean under-confident)."""
    mean = np.mean(member_probabilities, axis=0)
    if temperature == 1.0:
        return mean
    return softmax(np.log(np.clip(mean, 1e-12, None)) / np.float32(temperature)).astype(mean.dtype)


def face_from(box: Box, probabilities: np.ndarray) -> Face:
    best = int(np.argmax(probabilities))
    return Face(
        box=FaceBox(x=box.x, y=box.y, width=box.width, height=box.height),
        landmarks=landmarks_of(box),
        label=CLASSES[best],
        score=round(float(probabilities[best]), 6),
        probabilities=Probabilities(
            **{name: round(float(p), 6) for name, p in zip(CLASSES, probabilities, strict=True)}
        ),
    )
