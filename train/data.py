"""FER2013 in both public forms, decoded once into compact uint8 arrays.

* the original `fer2013.csv` (`emotion,pixels,Usage`; Usage = Training / PublicTest /
  PrivateTest), and
* image folders, `<root>/<split>/<class>/*.jpg` (e.g. the common Kaggle layout), and
* this package's packed form, `*.npz.xz` (`python -m train pack`): the decoded arrays of some
  splits in one lzma-compressed file, small enough to carry to a GPU machine.

Splits are named `train`, `validation` (= PublicTest) and `test` (= PrivateTest).
A decoded split is cached as `.npz` keyed by the source's path, size and mtime.
"""

from __future__ import annotations

import csv
import hashlib
import io
import lzma
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from service.card import CLASSES

IMAGE_SIZE = 48
CSV_USAGE = {"train": "Training", "validation": "PublicTest", "test": "PrivateTest"}
FOLDER_ALIASES = {
    "train": ("train", "training", "Training"),
    "validation": ("validation", "val", "valid", "PublicTest", "public_test"),
    "test": ("test", "PrivateTest", "private_test"),
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
DEFAULT_CACHE = Path(".cache/fer2013")
PACKED_SUFFIX = ".npz.xz"


class DatasetError(ValueError):
    """The data on disk is not FER2013 as this package understands it."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 48, 48]
    labels: np.ndarray  # int64 [N], indices into CLASSES

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DatasetError(f"images must be uint8 [N, 48, 48], got {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DatasetError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.images.tobytes())
        digest.update(self.labels.astype(np.int64).tobytes())
        return digest.hexdigest()[:16]

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(CLASSES))
        return {name: int(n) for name, n in zip(CLASSES, counts, strict=True)}

    def subset(self, per_class: int, seed: int = 0) -> Split:
        """At most `per_class` examples of each class, for quick runs and tests."""
        rng = np.random.default_rng(seed)
        keep = []
        for label in range(len(CLASSES)):
            indices = np.flatnonzero(self.labels == label)
            keep.extend(rng.permutation(indices)[:per_class])
        keep = np.sort(np.asarray(keep, dtype=np.int64))
        return Split(self.images[keep], self.labels[keep])


def seen_in(split: Split, reference: Split) -> np.ndarray:
    """Mask of `split`'s faces whose pixels are identical to a face in `reference`."""
    known = {image.tobytes() for image in reference.images}
    return np.fromiter((image.tobytes() in known for image in split.images), bool, len(split))


def load_split(source: str | Path, split: str, cache_dir: Path | None = DEFAULT_CACHE) -> Split:
    """Load one split from a `fer2013.csv` file or an image-folder root."""
    if split not in CSV_USAGE:
        raise DatasetError(f"unknown split {split!r}; expected one of {list(CSV_USAGE)}")
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"FER2013 not found at {source} (expected fer2013.csv or a folder)")
    if source.is_file() and source.name.endswith(PACKED_SUFFIX):
        stamp_path, reader = source, lambda: _read_packed(source, split)
    elif source.is_file():
        stamp_path, reader = source, lambda: _read_csv(source, split)
    else:
        folder = _split_folder(source, split)
        stamp_path, reader = folder, lambda: _read_folder(folder)
    if cache_dir is None:
        return reader()
    cached = Path(cache_dir) / f"{_source_key(stamp_path, split)}.npz"
    if cached.exists():
        with np.load(cached) as arrays:
            return Split(arrays["images"], arrays["labels"])
    data = reader()
    cached.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary name: two runs started together each write their own copy, then one wins.
    with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".tmp.npz", delete=False) as partial:
        np.savez(partial, images=data.images, labels=data.labels)
    os.replace(partial.name, cached)
    return data


def pack_splits(source: str | Path, out: str | Path, splits: tuple[str, ...]) -> Path:
    """Write `splits` of `source` (any form) into one packed `*.npz.xz` file."""
    out = Path(out)
    if not out.name.endswith(PACKED_SUFFIX):
        raise DatasetError(f"a packed file's name ends with {PACKED_SUFFIX}, got {out.name}")
    if not splits:
        raise DatasetError("no split to pack; name one or more of train, validation, test")
    arrays: dict[str, np.ndarray] = {}
    for split in splits:
        data = load_split(source, split)
        arrays[f"{split}_images"] = data.images
        arrays[f"{split}_labels"] = data.labels.astype(np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(lzma.compress(buffer.getvalue(), preset=9))
    return out


def _read_packed(path: Path, split: str) -> Split:
    try:
        arrays = np.load(io.BytesIO(lzma.decompress(path.read_bytes())))
    except (lzma.LZMAError, ValueError, OSError) as error:
        raise DatasetError(f"{path} is not a packed FER2013 file ({error})") from None
    with arrays:
        if f"{split}_images" not in arrays:
            held = sorted(key.removesuffix("_images") for key in arrays if key.endswith("_images"))
            raise DatasetError(f"{path} holds no {split!r} split (it has {held})")
        labels = arrays[f"{split}_labels"].astype(np.int64)
        if labels.size and labels.max() >= len(CLASSES):
            raise DatasetError(f"{path}: {split} labels outside 0..{len(CLASSES) - 1}")
        return Split(arrays[f"{split}_images"], labels)


def _source_key(path: Path, split: str) -> str:
    stat = path.stat()
    entries = [f"{path.resolve()}|{split}|{stat.st_size}|{stat.st_mtime_ns}"]
    if path.is_dir():
        for child in sorted(path.iterdir()):
            entries.append(f"{child.name}:{len(list(child.iterdir())) if child.is_dir() else 0}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:20]


def _split_folder(root: Path, split: str) -> Path:
    for name in FOLDER_ALIASES[split]:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(
        f"no folder for split {split!r} under {root}; looked for {list(FOLDER_ALIASES[split])}"
    )


def _read_folder(folder: Path) -> Split:
    images: list[np.ndarray] = []
    labels: list[int] = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if class_dir.name not in CLASSES:
            raise DatasetError(
                f"unknown class folder {class_dir} (expected one of {list(CLASSES)})"
            )
        label = CLASSES.index(class_dir.name)
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise DatasetError(f"cannot decode image {path}")
            if image.shape != (IMAGE_SIZE, IMAGE_SIZE):
                raise DatasetError(f"{path} is {image.shape[1]}x{image.shape[0]}, expected 48x48")
            images.append(image)
            labels.append(label)
    if not images:
        raise DatasetError(f"no images found under {folder}")
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64))


def _read_csv(path: Path, split: str) -> Split:
    usage = CSV_USAGE[split]
    images: list[np.ndarray] = []
    labels: list[int] = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"emotion", "pixels", "Usage"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{path} lacks the column(s) {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            if row["Usage"] != usage:
                continue
            try:
                label = int(row["emotion"])
                pixels = np.array(row["pixels"].split(), dtype=np.int64)
            except (TypeError, ValueError) as error:
                raise DatasetError(f"{path}:{line}: malformed row ({error})") from None
            if not 0 <= label < len(CLASSES):
                raise DatasetError(f"{path}:{line}: emotion {label} is not in 0..6")
            if pixels.size != IMAGE_SIZE * IMAGE_SIZE:
                raise DatasetError(f"{path}:{line}: {pixels.size} pixels, expected 2304 (48x48)")
            if pixels.min() < 0 or pixels.max() > 255:
                raise DatasetError(f"{path}:{line}: pixel values outside 0..255")
            images.append(pixels.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE))
            labels.append(label)
    if not images:
        raise DatasetError(f"{path} has no rows with Usage={usage}")
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64))
