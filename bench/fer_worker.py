"""Runs the `fer` package inside its own virtualenv for `bench.fer_compare` (never imported).

Usage: `<fer-venv>/bin/python bench/fer_worker.py [--keras] PHOTO...`. Loads
`FER(mtcnn=False)` once, warms it up on every photo, prints one JSON line
(`{"ready": ...}`) and then answers one JSON command per stdin line with one JSON line:

    {"cmd": "predict"}           -> {"labels": [top emotion of the largest face or null, ...]}
    {"cmd": "time", "seconds": S} -> {"images": n, "wall_s": w, "cpu_s": c}
    {"cmd": "quit"}

Each timed image is the whole library path from file bytes: `cv2.imdecode` (BGR, as
fer expects) then `detect_emotions`. Only the standard library, numpy, OpenCV and fer.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    keras = "--keras" in sys.argv[1:]
    paths = [Path(p) for p in sys.argv[1:] if p != "--keras"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import warnings

    warnings.filterwarnings("ignore")
    import cv2
    import fer
    import numpy as np

    try:
        from fer import FER
    except ImportError:  # fer 25.x no longer re-exports FER from the package root
        from fer.fer import FER
    import tensorflow as tf

    package_dir = Path(fer.__file__).resolve().parent
    weights = "emotion_model.hdf5" if keras else "emotion_model_quantized.tflite"
    model_file = package_dir / "data" / weights
    if not model_file.is_file():
        raise SystemExit(f"fer's bundled weights are missing: {model_file}")
    detector = FER(mtcnn=False, use_tflite=not keras)
    photos = [p.read_bytes() for p in paths]

    def run(data: bytes) -> list[dict]:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        return detector.detect_emotions(image)

    for data in photos:  # warm-up: loads the model and touches every code path
        run(data)
    print(json.dumps({
        "ready": True, "fer": fer.__version__, "tensorflow": tf.__version__,
        "opencv": cv2.__version__, "weights": str(model_file),
        "engine": "keras" if keras else "tflite", "cv2_threads": cv2.getNumThreads(),
    }), flush=True)

    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        if command["cmd"] == "predict":
            labels = []
            for data in photos:
                faces = run(data)
                if not faces:
                    labels.append(None)
                    continue
                largest = max(faces, key=lambda f: int(f["box"][2]) * int(f["box"][3]))
                labels.append(max(largest["emotions"], key=largest["emotions"].get))
            print(json.dumps({"labels": labels}), flush=True)
        elif command["cmd"] == "time":
            images, cpu, started = 0, time.process_time(), time.perf_counter()
            while time.perf_counter() - started < command["seconds"]:
                run(photos[images % len(photos)])
                images += 1
            print(json.dumps({"images": images, "wall_s": time.perf_counter() - started,
                              "cpu_s": time.process_time() - cpu}), flush=True)


if __name__ == "__main__":
    main()
