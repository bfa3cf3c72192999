"""Large test photos: `python -m bench.photos --out .cache/large-photos`.

Our labelled photos are 350x350; phones send 12-megapixel JPEGs. This writes
4032x3024 JPEGs (quality 90), each a 4x3 mosaic of the photos upscaled to 1008x1008,
so the large-image path (bounded decode and detection) can be timed on real faces.

`--frames 1280x720 --out .cache/hd-frames` writes instead one camera-sized frame per
labelled photo (`<out>/<label>/<name>.jpg`): the photo scaled to the frame's height and
centred on a mid-grey canvas, the shape a webcam or kiosk sends. The labels carry over, so
accuracy and speed can be compared on frames (`bench.fer_compare --photos`). `--source`
picks the labelled photos (default: ../shared/data/natural-faces, else the test fixtures),
e.g. `--source ../shared/data/natural-dev --frames 1280x720 --out .cache/dev-frames`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (ROOT.parent / "shared" / "data" / "natural-faces", ROOT / "tests" / "fixtures" / "faces")


def mosaics(sources: list[Path], count: int, tile: int = 1008, grid: tuple[int, int] = (4, 3)):
    columns, rows = grid
    for index in range(count):
        canvas = np.zeros((rows * tile, columns * tile, 3), np.uint8)
        for cell in range(columns * rows):
            image = cv2.imread(str(sources[(index * columns * rows + cell) % len(sources)]))
            y, x = divmod(cell, columns)
            canvas[y * tile:(y + 1) * tile, x * tile:(x + 1) * tile] = cv2.resize(
                image, (tile, tile), interpolation=cv2.INTER_CUBIC)
        yield canvas


def camera_frame(image: np.ndarray, width: int, height: int) -> np.ndarray:
    scale = height / image.shape[0]
    resized = cv2.resize(image, (max(1, round(image.shape[1] * scale)), height),
                         interpolation=cv2.INTER_CUBIC)
    resized = resized[:, :width]
    canvas = np.full((height, width, 3), 128, np.uint8)
    left = (width - resized.shape[1]) // 2
    canvas[:, left:left + resized.shape[1]] = resized
    return canvas


def write_frames(folder: Path, out: Path, width: int, height: int) -> None:
    for source in sorted(folder.glob("*/*.jpg")):
        target = out / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        frame = camera_frame(cv2.imread(str(source)), width, height)
        cv2.imwrite(str(target), frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
    print(f"{out}: {len(list(out.glob('*/*.jpg')))} frames of {width}x{height}")


def frame_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1280x720, got {text!r}")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "large-photos")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--frames", metavar="WxH", type=frame_size,
                        help="labelled camera frames instead")
    parser.add_argument("--source", type=Path, default=None,
                        help="labelled photos <source>/<label>/*.jpg (default: the first of "
                             f"{', '.join(str(s) for s in SOURCES)} that exists)")
    args = parser.parse_args(argv)
    candidates = [args.source] if args.source else list(SOURCES)
    folder = next((s for s in candidates if s.is_dir()), None)
    if folder is None or not any(folder.glob("*/*.jpg")):
        raise SystemExit(f"no labelled photos in {[str(s) for s in candidates]}")
    if args.frames:
        write_frames(folder, args.out, *args.frames)
        return
    sources = sorted(folder.glob("*/*.jpg"))
    args.out.mkdir(parents=True, exist_ok=True)
    for index, canvas in enumerate(mosaics(sources, args.count)):
        path = args.out / f"mosaic_{index}.jpg"
        cv2.imwrite(str(path), canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])
        print(f"{path} {canvas.shape[1]}x{canvas.shape[0]} {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
