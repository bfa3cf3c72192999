"""`python -m train evaluate`: measure exported models through the service's own code.

FER2013 splits go through `service.preprocess` and ONNX Runtime exactly as a request
with `detect=false` would; natural photos go through decode -> Haar detection ->
crop -> classify, as `POST /predict` does (an undetected face counts as wrong).
Several `--model` folders are evaluated as the ensemble (mean of probabilities).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from service.card import CLASSES
from service.detector import DetectorConfig, FaceDetector
from service.imaging import decode_grayscale
from service.model_store import ensemble_temperature, read_ensemble_calibration
from service.onnx_model import OnnxModel
from service.pipeline import combine_members
from service.preprocess import WHOLE_IMAGE_CROP, crop_face, normalize, whole_image_box
from service.tta import tta_views
from train.calibrate import expected_calibration_error
from train.data import Split, load_split, seen_in
from train.plots import save_confusion_png

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def open_model(folder: Path, tta_override: list[str] | None = None) -> OnnxModel:
    model = OnnxModel(Path(folder), ["CPUExecutionProvider"], threads=0)
    if tta_override is not None:
        model.card = model.card.model_copy(update={"tta": list(tta_override)})
    return model


def classify_faces(models: list[OnnxModel], faces: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Mean probabilities [N, 7] of `models` on uint8 face crops [N, H, W], each
    pre-processed as the service does with `detect=false`."""
    per_model = []
    for model in models:
        card = model.card
        chunks = []
        for start in range(0, len(faces), batch_size):
            chunk = np.stack([crop_face(face, whole_image_box(face), WHOLE_IMAGE_CROP,
                                        card.input.size)
                              for face in faces[start : start + batch_size]])
            chunks.append(model.infer(normalize(chunk, card.input)))
        per_model.append(np.concatenate(chunks))
    return combine_members(per_model, store_temperature(models))


def store_temperature(models: list[OnnxModel]) -> float:
    """The ensemble temperature the service would apply to these members (1 for one model)."""
    if len(models) < 2:
        return 1.0
    calibration = read_ensemble_calibration(models[0].folder.parent.parent)
    return ensemble_temperature(calibration, tuple(models))


def summarize(labels: np.ndarray, predictions: np.ndarray) -> dict[str, Any]:
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    per_class = {
        name: round(float(confusion[i, i] / max(confusion[i].sum(), 1)), 4)
        for i, name in enumerate(CLASSES)
    }
    return {
        "count": int(len(labels)),
        "accuracy": round(float((labels == predictions).mean()), 4) if len(labels) else 0.0,
        "per_class_accuracy": per_class,
        "confusion": confusion.tolist(),
    }


def evaluate_split(folders: Path | list[Path], split: Split,
                   tta_override: list[str] | None = None,
                   seen_in_training: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy, per-class accuracy, confusion and ECE of `folders` (several = the
    ensemble) on `split`; with `seen_in_training`, also on the faces not in training."""
    folders = [folders] if isinstance(folders, Path) else folders
    models = [open_model(folder, tta_override) for folder in folders]
    probabilities = classify_faces(models, split.images)
    report = summarize(split.labels, probabilities.argmax(1))
    report["tta"] = sorted({t for m in models for t in m.card.tta})
    report["ece"] = round(expected_calibration_error(probabilities, split.labels), 4)
    report["temperatures"] = [m.card.temperature for m in models]
    if seen_in_training is not None:
        clean = ~seen_in_training
        report["clean"] = {
            "count": int(clean.sum()),
            "accuracy": round(
                float((probabilities[clean].argmax(1) == split.labels[clean]).mean()), 4),
            "excluded": "faces pixel-identical to a training face"}
    return report


def mirror_report(folders: list[Path], split: Split,
                  seen_in_training: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy of each face alone and of its mirror image alone (no TTA), of the two
    averaged, and how often the two agree: how mirror-symmetric the network is, and so
    how much of an hflip TTA gain is one view being luckier than the other."""
    models = [open_model(folder, []) for folder in folders]
    original = classify_faces(models, split.images)
    mirrored = classify_faces(models, np.ascontiguousarray(split.images[:, :, ::-1]))

    def views(mask: np.ndarray) -> dict[str, Any]:
        labels = split.labels[mask]
        first, second = original[mask].argmax(1), mirrored[mask].argmax(1)
        averaged = (original[mask] + mirrored[mask]).argmax(1)
        return {"count": int(mask.sum()),
                "original": round(float((first == labels).mean()), 4),
                "mirrored": round(float((second == labels).mean()), 4),
                "averaged": round(float((averaged == labels).mean()), 4),
                "agreement_top1": round(float((first == second).mean()), 4)}

    report = views(np.ones(len(split), bool))
    if seen_in_training is not None:
        report["clean"] = views(~seen_in_training)
    return report


def subset_report(folders: list[Path], split: Split, tta_override: list[str] | None = None,
                  seen_in_training: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Accuracy of every ensemble of two or more of `folders` (the mean of the members'
    probabilities, as the service combines them), best first. Each member is run once."""
    members = [classify_faces([open_model(folder, tta_override)], split.images)
               for folder in folders]
    rows = []
    for size in range(2, len(folders) + 1):
        for chosen in itertools.combinations(range(len(folders)), size):
            predictions = np.mean([members[i] for i in chosen], axis=0).argmax(1)
            row: dict[str, Any] = {
                "members": [str(folders[i]) for i in chosen],
                "accuracy": round(float((predictions == split.labels).mean()), 4)}
            if seen_in_training is not None:
                clean = ~seen_in_training
                row["clean_accuracy"] = round(
                    float((predictions[clean] == split.labels[clean]).mean()), 4)
            rows.append(row)
    return sorted(rows, key=lambda row: -row["accuracy"])


def photo_labels(folder: Path) -> list[tuple[Path, int]]:
    items = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if class_dir.name not in CLASSES:
            continue
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in PHOTO_SUFFIXES:
                items.append((path, CLASSES.index(class_dir.name)))
    if not items:
        raise ValueError(f"no labelled photos (<class>/<image>) under {folder}")
    return items


def evaluate_photos(folders: Path | list[Path], photos: Path,
                    detector: DetectorConfig | None = None,
                    tta_override: list[str] | None = None) -> dict[str, Any]:
    """End to end on labelled photos: largest Haar face per photo; none found = wrong."""
    detector = detector or DetectorConfig()
    folders = [folders] if isinstance(folders, Path) else folders
    models = [open_model(folder, tta_override) for folder in folders]
    face_detector = FaceDetector(detector)
    temperature = store_temperature(models)
    labels, predictions, detected = [], [], 0
    for path, label in photo_labels(photos):
        gray = decode_grayscale(path.read_bytes(), max_pixels=100_000_000)
        boxes = face_detector.detect(gray)
        labels.append(label)
        if not boxes:
            predictions.append(-1)
            continue
        detected += 1
        per_model = []
        for model in models:
            card = model.card
            crop = crop_face(gray, boxes[0], card.face_crop, card.input.size)
            per_model.append(model.infer(normalize(crop[None], card.input)))
        predictions.append(int(combine_members(per_model, temperature)[0].argmax()))
    labels_arr, predictions_arr = np.asarray(labels), np.asarray(predictions)
    found = predictions_arr >= 0
    report = summarize(labels_arr[found], predictions_arr[found])
    return {
        "photos": len(labels),
        "detected": detected,
        "detection_rate": round(detected / len(labels), 4),
        "accuracy_end_to_end": round(float((labels_arr == predictions_arr).mean()), 4),
        "accuracy_on_detected": report["accuracy"],
        "confusion_on_detected": report["confusion"],
        "detector": detector.__dict__,
    }


def main(args: argparse.Namespace) -> None:
    folders = [Path(m) for m in args.model.split(",")]
    if args.subsets and len(folders) < 3:
        raise SystemExit("--subsets needs three or more comma-separated --model folders")
    if (args.mirror or args.subsets) and not args.data:
        raise SystemExit("--mirror and --subsets score a FER2013 split: give --data")
    tta = {"card": None, "none": []}.get(args.tta)
    if args.tta not in ("card", "none"):
        tta = [name.strip() for name in args.tta.split(",") if name.strip()]
        try:
            tta_views(tta)
        except ValueError as error:
            raise SystemExit(f"--tta: {error}") from None
    results: dict[str, Any] = {"models": [str(f) for f in folders]}
    if args.data:
        split = load_split(args.data, args.split)
        seen = seen_in(split, load_split(args.data, "train")) if args.split != "train" else None
        results[args.split] = evaluate_split(folders, split, tta, seen)
        if args.mirror:
            results[args.split]["mirror"] = mirror_report(folders, split, seen)
        if args.subsets:
            results[args.split]["subsets"] = subset_report(folders, split, tta, seen)
    if args.photos:
        results["natural_photos"] = evaluate_photos(folders, Path(args.photos), tta_override=tta)
    if len(results) == 1:
        raise SystemExit("give --data (a FER2013 split) and/or --photos")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(results, indent=1))
        if args.data:
            report = results[args.split]
            save_confusion_png(report["confusion"], out / f"confusion_{args.split}.png",
                               title=f"{args.split}: accuracy {report['accuracy']:.4f}")
    print(json.dumps(results, indent=1))
