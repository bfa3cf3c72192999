"""CPU time per image, stage by stage: `python -m bench.stages`.

Runs the service's own stage functions on one thread, as a worker thread of the server
runs them (OpenCV single-threaded, ONNX Runtime with `--ort-threads`), and reports
process CPU time (not wall time, so other processes on the machine distort it little):
decode, detect, preprocess (crop + normalise), and inference per face at several batch
sizes for each model. What is left of a request (HTTP, JSON, asyncio, batching) is the
server's CPU per image from `bench.ab` minus these. Use it to see which stage bounds
throughput, and what a GPU (which makes inference almost free) would leave.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from bench.load import load_photos
from bench.stores import latest_versions, resolve_store

ROOT = Path(__file__).resolve().parent.parent


def cpu_ms(work, repeats: int) -> float:
    """Median CPU milliseconds of `work()` over `repeats` runs (after one warm-up)."""
    work()
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        work()
        samples.append(1000 * (time.process_time() - started))
    return statistics.median(samples)


def shrink(gray: np.ndarray, side: int) -> np.ndarray:
    """The detector's own first step: INTER_AREA down to `side` (longest)."""
    scale = min(1.0, side / max(gray.shape))
    if scale == 1.0:
        return gray
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path,
                        default=ROOT.parent / "shared" / "data" / "natural-faces")
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--max-sides", default="640,320,240,160",
                        type=lambda s: [int(x) for x in s.split(",")],
                        help="detect_max_side values to time")
    parser.add_argument("--retinaface-sides", default="640,320,240",
                        type=lambda s: [int(x) for x in s.split(",")],
                        help="retinaface_max_side values to time")
    parser.add_argument("--batches", default="1,8,32",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--ort-threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from service.card import FaceCropSpec
    from service.detector import DetectorConfig, FaceDetector
    from service.imaging import decode
    from service.onnx_model import OnnxModel
    from service.preprocess import crop_face, normalize

    cv2.setNumThreads(1)
    if not args.photos.is_dir():
        args.photos = ROOT / "tests" / "fixtures" / "faces"
    photos = load_photos(args.photos)
    grays = [decode(d, 10**9).gray for d in photos]
    sides = [max(g.shape) for g in grays]
    print(f"# {len(photos)} photos (longest side {min(sides)}-{max(sides)} px) from "
          f"{args.photos}; CPU ms, median of {args.repeats} passes, one thread")
    decode_ms = cpu_ms(lambda: [decode(d, 10**9) for d in photos], args.repeats) / len(photos)
    print(f"decode                       {decode_ms:8.2f} ms/image")
    # What the server does before detection: decode (reduced for large JPEGs since the
    # bounded-decode change) and shrink to detect_max_side (640), old way and new way.
    detector = FaceDetector(DetectorConfig())
    need = math.ceil(640 * 48 / detector.config.min_size)
    for label, side in (("full decode", None), (f"reduced >= {need}px", need)):
        ms = cpu_ms(lambda side=side: [shrink(decode(d, 10**9, side).gray, 640) for d in photos],
                    args.repeats) / len(photos)
        print(f"decode + shrink to 640, {label:<18} {ms:8.2f} ms/image")
    boxes = None
    for side in args.max_sides:
        detector = FaceDetector(DetectorConfig(max_side=side))
        found = [detector.detect(g) for g in grays]
        boxes = boxes or found
        ms = cpu_ms(lambda d=detector: [d.detect(g) for g in grays], args.repeats) / len(grays)
        faces = sum(1 for f in found if f)
        print(f"detect (detect_max_side={side:<4}) {ms:8.2f} ms/image   faces found in "
              f"{faces}/{len(grays)} images")
    from service.retinaface import RetinaFaceConfig, RetinaFaceDetector

    for side in args.retinaface_sides:
        # The side alone bounds the search here (no pixel budget below side x side).
        detector = RetinaFaceDetector(RetinaFaceConfig(max_side=side, max_pixels=side * side))
        found = [detector.detect(g) for g in grays]
        ms = cpu_ms(lambda d=detector: [d.detect(g) for g in grays], args.repeats) / len(grays)
        faces = sum(1 for f in found if f)
        print(f"detect retinaface (side={side:<4}) {ms:6.2f} ms/image   faces found in "
              f"{faces}/{len(grays)} images")
    pairs = [(g, b) for g, bs in zip(grays, boxes, strict=True) for b in bs[:1]]
    spec = FaceCropSpec()

    def preprocess() -> None:
        crops = [crop_face(g, b, spec, 48) for g, b in pairs]
        from service.card import InputSpec

        normalize(np.stack(crops), InputSpec(mean=0.5, std=0.25))

    if pairs:
        ms = cpu_ms(preprocess, args.repeats) / len(pairs)
        print(f"preprocess (crop+normalise)  {ms:8.2f} ms/face")
    store = resolve_store(args.store)
    rng = np.random.default_rng(0)
    for name, folder in latest_versions(store).items():
        model = OnnxModel(folder, ["CPUExecutionProvider"], args.ort_threads)
        cells = []
        for batch in args.batches:
            x = rng.standard_normal((batch, 1, 48, 48), dtype=np.float32)
            reps = max(3, args.repeats * 8 // batch)
            cells.append(f"b{batch} {cpu_ms(partial(model.infer, x), reps) / batch:6.2f}")
        print(f"inference {name:<18} {'  '.join(cells)} ms/face  (ORT threads "
              f"{args.ort_threads}, {store.name})")


if __name__ == "__main__":
    main()
