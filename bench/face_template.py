"""Where FER2013 frames the face: `python -m bench.face_template`.

Runs RetinaFace (the service's detector, `service/retinaface.py`) on a random sample of
FER2013 training faces and prints the median landmark positions as fractions of the
48-px side, the eye centre, the eye-to-mouth distance and the roll. `service/preprocess.py`
aligns detected faces to these numbers (`ALIGNED_EYES_CENTRE`, `ALIGNED_EYE_TO_MOUTH`),
so an aligned crop is framed as the faces the networks were trained on.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT.parent / "shared" / "data" / "fer2013" / "train"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--faces", type=Path, default=TRAIN, help="<class>/<image> folders")
    parser.add_argument("--sample", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from service.retinaface import RetinaFaceConfig, RetinaFaceDetector

    paths = sorted(args.faces.glob("*/*.jpg")) + sorted(args.faces.glob("*/*.png"))
    if not paths:
        raise SystemExit(f"no faces under {args.faces}")
    random.Random(args.seed).shuffle(paths)
    paths = paths[: args.sample]
    # 48-px faces fill their frame: upscaled to 192 px they fit RetinaFace's priors.
    detector = RetinaFaceDetector(RetinaFaceConfig(min_side=192, score_threshold=0.5))
    points = []
    for path in paths:
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        faces = detector.detect(gray)
        if faces:
            points.append(np.asarray(faces[0].landmarks) / np.asarray(gray.shape[::-1]))
    if not points:
        raise SystemExit("RetinaFace found no face in the sample")
    lm = np.asarray(points)
    eyes, mouth = lm[:, :2].mean(axis=1), lm[:, 3:].mean(axis=1)
    roll = np.degrees(np.arctan2(lm[:, 1, 1] - lm[:, 0, 1], lm[:, 1, 0] - lm[:, 0, 0]))
    print(f"# RetinaFace found a face in {len(lm)} of {len(paths)} faces from {args.faces}")
    for name, (x, y) in zip(("eye (image left)", "eye (image right)", "nose",
                             "mouth corner (left)", "mouth corner (right)"),
                            np.median(lm, axis=0), strict=True):
        print(f"{name:<22} x {x:.3f}  y {y:.3f}")
    centre = np.median(eyes, axis=0)
    print(f"ALIGNED_EYES_CENTRE  = ({centre[0]:.3f}, {centre[1]:.3f})")
    print(f"ALIGNED_EYE_TO_MOUTH = {np.median(np.linalg.norm(mouth - eyes, axis=1)):.3f}")
    print(f"roll: median |angle| {np.median(np.abs(roll)):.1f} deg, "
          f"90th percentile {np.percentile(np.abs(roll), 90):.1f} deg")


if __name__ == "__main__":
    main()
