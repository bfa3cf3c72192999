"""Face-finding plans, recall against CPU time: `python -m bench.detectors haar|retinaface`.

For every configuration in the cartesian product of `--grid` (e.g.
`--grid border=0,0.1,0.25 max_side=160,200,320 min_neighbors=3,5`), runs the service's
own detector over each `--photos` set, decoded as the service decodes them (bounded JPEG
decode at the detector's `decode_side`), on one thread (OpenCV and ONNX Runtime single-
threaded, as a worker of the server's CPU pool runs them), and prints per set:

* found: images in which at least one face was found (each photo holds one main face,
  so this is the detection recall; the end-to-end accuracy is `bench.accuracy`'s job);
* extra: images with more than one face (mostly false faces on these one-face photos);
* ms: CPU milliseconds of detection per image (process time, median of `--repeats`
  passes; decoding excluded, it is the same for every plan).

Haar plans take the fields of `service.detector.DetectorConfig` (`fallback_max_side`,
`fallback_border`, `fallback_min_neighbors` for the second pass that runs only when the
first finds nothing); RetinaFace plans the fields of `service.retinaface.RetinaFaceConfig`
plus `color=1` (feed the decoded BGR image instead of the gray plane the service uses).

Default sets: ../shared/data/natural-dev (300 labelled photos) and, when present, its
1280x720 camera frames (`python -m bench.photos --source ../shared/data/natural-dev
--frames 1280x720 --out .cache/dev-frames`). Found counts do not depend on the machine's
load; the ms do (process time less than wall time): compare plans within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NATURAL_DEV = ROOT.parent / "shared" / "data" / "natural-dev"
DEV_FRAMES = ROOT / ".cache" / "dev-frames"
SUFFIXES = {".jpg", ".jpeg", ".png"}


def parse_grid(items: list[str]) -> list[dict[str, str]]:
    """['a=1,2', 'b=3'] -> [{'a': '1', 'b': '3'}, {'a': '2', 'b': '3'}]."""
    axes = []
    for item in items:
        name, _, values = item.partition("=")
        if not name or not values:
            raise SystemExit(f"--grid expects name=v1,v2,..., got {item!r}")
        axes.append([(name, value) for value in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] or [{}]


def typed(config_type: type, values: dict[str, str]) -> dict[str, object]:
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    out: dict[str, object] = {}
    for name, text in values.items():
        if name not in fields:
            raise SystemExit(f"{config_type.__name__} has no field {name!r}; "
                             f"fields: {', '.join(fields)}")
        default = getattr(config_type(), name)
        if isinstance(default, bool):
            out[name] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, Path):
            out[name] = Path(text)
        else:
            out[name] = type(default)(text) if default is not None else float(text)
    return out


def load_set(folder: Path) -> list[bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)
    if not paths:
        raise SystemExit(f"no photos under {folder}")
    return [p.read_bytes() for p in paths]


def cpu_ms_per_image(work, images: list, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        for image in images:
            work(image)
        samples.append(1000 * (time.process_time() - started) / len(images))
    return statistics.median(samples)


def build(kind: str, values: dict[str, str]):
    """(detector, whether it wants colour) for one grid point."""
    values = dict(values)
    if kind == "haar":
        from service.detector import DetectorConfig, FaceDetector

        return FaceDetector(DetectorConfig(**typed(DetectorConfig, values))), False
    from service.retinaface import RetinaFaceConfig, RetinaFaceDetector

    color = values.pop("color", "0").lower() in ("1", "true", "yes")
    return RetinaFaceDetector(RetinaFaceConfig(**typed(RetinaFaceConfig, values))), color


def decoded(data: list[bytes], side: int, color: bool) -> list[np.ndarray]:
    from service.imaging import decode

    images = [decode(d, 10**9, side).gray for d in data]
    if not color:
        return images
    # Colour at the same (reduced) size as the gray decode, for a like-for-like comparison.
    out = []
    for d, gray in zip(data, images, strict=True):
        bgr = cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)
        out.append(cv2.resize(bgr, gray.shape[::-1], interpolation=cv2.INTER_AREA)
                   if bgr.shape[:2] != gray.shape else bgr)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["haar", "retinaface"])
    parser.add_argument("--grid", nargs="*", default=[], metavar="FIELD=V1,V2")
    parser.add_argument("--photos", type=Path, action="append", default=None,
                        help="a folder of photos (repeatable); default natural-dev and its frames")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    sets = args.photos or [s for s in (NATURAL_DEV, DEV_FRAMES) if s.is_dir()]
    if not sets:
        raise SystemExit(f"no photos: give --photos (default {NATURAL_DEV}, {DEV_FRAMES})")
    cv2.setNumThreads(1)
    data = {folder: load_set(folder) for folder in sets}
    names = [folder.name for folder in sets]
    print(f"# {args.kind}, one thread, CPU ms/image median of {args.repeats}; sets: "
          + ", ".join(f"{n} ({len(data[f])})" for n, f in zip(names, sets, strict=True)))
    header = f"{'plan':<58}" + "".join(f" | {n[:14]:>14} found extra    ms" for n in names)
    print(header)
    print("-" * len(header))
    cache: dict[tuple[Path, int, bool], list[np.ndarray]] = {}
    for values in parse_grid(args.grid):
        detector, color = build(args.kind, values)
        side = detector.decode_side(48)
        cells = []
        for folder in sets:
            key = (folder, side, color)
            if key not in cache:
                cache[key] = decoded(data[folder], side, color)
            images = cache[key]
            found = [detector.detect(image) for image in images]
            ms = cpu_ms_per_image(detector.detect, images, args.repeats)
            hits = sum(1 for f in found if f)
            extra = sum(1 for f in found if len(f) > 1)
            cells.append(f" | {hits:>9}/{len(images):<4} {extra:>5} {ms:>5.1f}")
        plan = " ".join(f"{k}={v}" for k, v in values.items()) or "defaults"
        print(f"{plan:<58}" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
