"""`python -m train compare`: the arms of an A/B, side by side, before anything is exported.

For each run folder (or checkpoint) the best epoch's weights score the validation split
with one pass and with the mirror image averaged in (hflip, as cards with `tta: hflip`
serve), on all faces and on the clean ones (not pixel-identical to a training face), and
the top-1 ECE at T = 1 and after the temperature fitted on validation. The pre-processing
is the service's (`predict_logits` -> `service.preprocess.normalize`), the temperature fit
and ECE are `train/calibrate.py`'s, so the figures match what an exported card would say.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.card import InputSpec
from train.calibrate import expected_calibration_error, fit_temperature, probabilities_at
from train.data import Split, load_split, seen_in
from train.export import load_checkpoint
from train.fit import predict_logits

VIEWS = {"none": 1, "hflip": 2}


def checkpoint_path(run: Path) -> Path:
    path = run / "best.pt" if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no best.pt (a run folder or a checkpoint file)")
    return path


def two_view_logits(model: torch.nn.Module, faces: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Logits [2 * N, 7]: the faces, then their mirror images (`probabilities_at`'s layout)."""
    cpu = torch.device("cpu")
    mirrored = np.ascontiguousarray(faces[:, :, ::-1])
    return np.concatenate([predict_logits(model, faces, spec, cpu),
                           predict_logits(model, mirrored, spec, cpu)])


def score_run(run: Path, validation: Split, clean: np.ndarray) -> dict[str, Any]:
    model, checkpoint = load_checkpoint(checkpoint_path(run))
    faces = validation.images
    logits = two_view_logits(model, faces, InputSpec(**checkpoint["input_spec"]))
    row: dict[str, Any] = {"run": str(run), "epoch": checkpoint["epoch"]}
    labels = validation.labels
    for name, variants in VIEWS.items():
        view_logits = logits[: len(faces) * variants]
        raw = probabilities_at(view_logits, variants, 1.0)
        temperature = fit_temperature(view_logits, variants, labels)
        scaled = probabilities_at(view_logits, variants, temperature)
        right = raw.argmax(1) == labels
        row[name] = {
            "accuracy": round(float(right.mean()), 4),
            "clean_accuracy": round(float(right[clean].mean()), 4),
            "ece_before": round(expected_calibration_error(raw, labels), 4),
            "temperature": temperature,
            "ece_after": round(expected_calibration_error(scaled, labels), 4),
        }
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | best epoch | val (1 pass) | val hflip | clean hflip | ECE at T=1 (hflip) "
             "| T | ECE after |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        one, flip = row["none"], row["hflip"]
        lines.append(f"| {row['run']} | {row['epoch']} | {100 * one['accuracy']:.2f} % "
                     f"| {100 * flip['accuracy']:.2f} % | {100 * flip['clean_accuracy']:.2f} % "
                     f"| {flip['ece_before']:.3f} | {flip['temperature']:.3f} "
                     f"| {flip['ece_after']:.3f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    validation = load_split(args.data, "validation")
    clean = ~seen_in(validation, load_split(args.data, "train"))
    rows = [score_run(Path(run), validation, clean) for run in args.run]
    print(format_table(rows))  # noqa: T201
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
