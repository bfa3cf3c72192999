"""Temperature scaling (Guo et al. 2017): one scalar T per model, fitted on the validation
split by minimising the negative log-likelihood of the probabilities the service returns
(softmax(logits / T), averaged over the card's test-time variants). T does not change
the argmax of a single pass, so accuracy is unchanged; confidences come to match it.

`python -m train calibrate --model model_store/<name>/<version>` fits T for an exported
version and writes it, with the calibration error before and after, into its card.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from service.card import CARD_FILENAME, ModelCard
from service.onnx_model import OnnxModel
from service.preprocess import WHOLE_IMAGE_CROP, crop_face, normalize, softmax, whole_image_box
from service.tta import merge_tta, tta_views
from train.data import Split, load_split, seen_in

log = logging.getLogger("train.calibrate")

ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """Top-1 ECE: the count-weighted mean |accuracy - confidence| over equal-width
    confidence bins."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


def probabilities_at(logits: np.ndarray, variants: int, temperature: float) -> np.ndarray:
    """What the service returns for raw per-variant logits [V * N, 7] at temperature T."""
    return merge_tta(softmax(logits / np.float32(temperature)), variants)


def negative_log_likelihood(logits: np.ndarray, variants: int, labels: np.ndarray,
                            temperature: float) -> float:
    probabilities = probabilities_at(logits, variants, temperature)
    return float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels],
                                 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, variants: int, labels: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE with the lowest validation NLL (golden-section search on
    log T; the NLL is unimodal in T)."""
    lo, hi = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0

    def loss(log_t: float) -> float:
        return negative_log_likelihood(logits, variants, labels, float(np.exp(log_t)))

    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(60):
        if loss_a < loss_b:
            hi, b, loss_b = b, a, loss_a
            a = lo + (1 - ratio) * (hi - lo)
            loss_a = loss(a)
        else:
            lo, a, loss_a = a, b, loss_b
            b = lo + ratio * (hi - lo)
            loss_b = loss(b)
    return round(float(np.exp((lo + hi) / 2.0)), 4)


def split_logits(model: OnnxModel, split: Split, batch_size: int = 512) -> np.ndarray:
    """Raw logits [V * N, 7] of a FER2013 split through the service's `detect=false` path."""
    card = model.card
    variants = tta_views(card.tta)
    chunks = []
    for start in range(0, len(split), batch_size):
        faces = split.images[start : start + batch_size]
        crops = np.stack([crop_face(face, whole_image_box(face), WHOLE_IMAGE_CROP, card.input.size)
                          for face in faces])
        chunks.append(model.logits(normalize(crops, card.input)).reshape(variants, len(faces), -1))
    return np.concatenate(chunks, axis=1).reshape(-1, chunks[0].shape[-1])


def calibration_report(logits: np.ndarray, variants: int, labels: np.ndarray,
                       temperature: float, clean: np.ndarray | None = None) -> dict[str, Any]:
    before = probabilities_at(logits, variants, 1.0)
    after = probabilities_at(logits, variants, temperature)
    report = {
        "method": "temperature scaling, NLL on the validation split",
        "temperature": temperature,
        "ece_bins": ECE_BINS,
        "ece_before": round(expected_calibration_error(before, labels), 4),
        "ece_after": round(expected_calibration_error(after, labels), 4),
        "nll_before": round(negative_log_likelihood(logits, variants, labels, 1.0), 4),
        "nll_after": round(negative_log_likelihood(logits, variants, labels, temperature), 4),
        "mean_confidence_after": round(float(after.max(1).mean()), 4),
        "accuracy_after": round(float((after.argmax(1) == labels).mean()), 4),
    }
    if clean is not None and clean.any():
        report["ece_after_clean"] = round(
            expected_calibration_error(after[clean], labels[clean]), 4)
    return report


def calibrate_version(folder: Path, validation: Split,
                      train: Split | None = None) -> dict[str, Any]:
    """Fit T for the exported version in `folder` and return its calibration report (the
    caller decides whether to write it into the card)."""
    model = OnnxModel(folder, ["CPUExecutionProvider"], threads=0)
    model.card = model.card.model_copy(update={"temperature": 1.0})
    variants = tta_views(model.card.tta)
    logits = split_logits(model, validation)
    temperature = fit_temperature(logits, variants, validation.labels)
    clean = ~seen_in(validation, train) if train is not None else None
    return calibration_report(logits, variants, validation.labels, temperature, clean)


def write_calibration(folder: Path, report: dict[str, Any]) -> ModelCard:
    card = ModelCard.read(folder / CARD_FILENAME)
    card.temperature = report["temperature"]
    card.metrics.setdefault("validation", {})["calibration"] = report
    card.write(folder / CARD_FILENAME)
    return card


def calibrate_ensemble(folders: list[Path], validation: Split) -> dict[str, Any]:
    """Fit the ensemble's own temperature (on the log of its members' mean, each member at
    its card's temperature) for exactly these member versions."""
    from train.evaluate import classify_faces, open_model

    models = [open_model(folder) for folder in folders]
    per_model = [classify_faces([model], validation.images) for model in models]
    mean_log = np.log(np.clip(np.mean(per_model, axis=0), 1e-12, None)).astype(np.float32)
    temperature = fit_temperature(mean_log, 1, validation.labels)
    report = calibration_report(mean_log, 1, validation.labels, temperature)
    report["method"] = ("temperature scaling of log(mean member probabilities), NLL on the "
                        "validation split")
    report["members"] = [f"{m.name}:{m.version}" for m in models]
    return report


def main(args: argparse.Namespace) -> None:
    validation = load_split(args.data, "validation")
    if "," in args.model:
        from service.model_store import ENSEMBLE_CALIBRATION

        folders = [Path(m) for m in args.model.split(",")]
        report = calibrate_ensemble(folders, validation)
        if not args.dry_run:
            target = folders[0].parent.parent / ENSEMBLE_CALIBRATION
            partial = target.with_name(f".{target.name}.partial")
            partial.write_text(json.dumps(report, indent=1) + "\n")
            partial.replace(target)
            log.info("wrote ensemble temperature %.4f into %s", report["temperature"], target)
        print(json.dumps(report, indent=1))
        return
    folder = Path(args.model)
    train = load_split(args.data, "train")
    report = calibrate_version(folder, validation, train)
    if not args.dry_run:
        write_calibration(folder, report)
        log.info("wrote temperature %.4f into %s", report["temperature"], folder / CARD_FILENAME)
    print(json.dumps(report, indent=1))
