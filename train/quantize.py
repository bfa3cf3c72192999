"""`python -m train quantize`: int8 static quantization of an exported version.

ONNX Runtime's own tools (`onnxruntime.quantization`) turn `model.onnx` into an int8 graph
(uint8 activations, int8 weights), with activation ranges calibrated on FER2013 training
faces pre-processed exactly as the service feeds them (the card's normalisation through
`service.preprocess`, plus the card's test-time views, e.g. mirror images). Both graphs
are then measured on the whole validation split with the card's TTA and temperature
(`train.evaluate`'s code). The int8 file is kept beside `model.onnx` only when it loses
at most `--max-drop-points` of validation accuracy *and* picks the same class as fp32 on at
least `--min-agreement` of validation faces (a graph can keep its accuracy while changing
many answers, which a user sees as the service disagreeing with itself); either way the
measurement goes into the card's `int8` field, which the service reads (FER_INT8).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service import cpu_features
from service.card import (
    CARD_FILENAME,
    INT8_FILENAME,
    MODEL_FILENAME,
    Int8Check,
    Int8Spec,
    ModelCard,
)
from service.onnx_model import OnnxModel
from service.preprocess import WHOLE_IMAGE_CROP, crop_face, normalize, whole_image_box
from train.calibrate import expected_calibration_error
from train.data import Split, load_split, seen_in
from train.provenance import git_commit

log = logging.getLogger("train.quantize")

METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq", "qoperator")
MAX_DROP_POINTS = 0.3
MIN_AGREEMENT = 0.95
# Calibration batches are run (and their activations collected) this many at a time, so
# the histogram methods hold one batch's activations in memory, not all of them.
CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class KeepBudget:
    """When an int8 graph is kept: at most `max_drop_points` of validation accuracy lost,
    and the fp32 graph's top-1 class on at least `min_agreement` of validation faces."""

    max_drop_points: float = MAX_DROP_POINTS
    min_agreement: float = MIN_AGREEMENT

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"--min-agreement is a share of faces between 0 and 1, "
                             f"got {self.min_agreement}")
        if not self.max_drop_points >= 0.0:  # also refuses nan
            raise ValueError(f"--max-drop-points must be 0 or more, got {self.max_drop_points}")

    @classmethod
    def unlimited(cls) -> KeepBudget:
        """Keeps whatever is measured (for tests that need the file whatever it scores)."""
        return cls(max_drop_points=100.0, min_agreement=0.0)

    def allows(self, drop_points: float, agreement: float) -> bool:
        return drop_points <= self.max_drop_points and agreement >= self.min_agreement


@dataclass(frozen=True)
class QuantizeConfig:
    faces: int = 1024
    method: str = "minmax"
    format: str = "qdq"
    per_channel: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; "
                             f"expected one of {METHODS}")
        if self.format not in FORMATS:
            raise ValueError(f"unknown quantization format {self.format!r}; "
                             f"expected one of {FORMATS}")
        if self.faces < 1:
            raise ValueError("at least one calibration face is needed")


OPTION_HELP = {
    "faces": "training faces the activation ranges are calibrated on (each with the card's "
             "test-time views), drawn at random",
    "method": "how activation ranges are chosen from the calibration activations: minmax "
              "(their extremes), entropy (KL divergence), percentile (99.999th)",
    "format": "qdq (QuantizeLinear/DequantizeLinear pairs, fused by ONNX Runtime at load) or "
              "qoperator (QLinearConv, QLinearMatMul, ... written into the graph)",
    "per_channel": "one weight scale per output channel instead of per tensor",
    "seed": "random draw of the calibration faces",
}


def network_input(model: OnnxModel, faces: np.ndarray) -> np.ndarray:
    """uint8 FER2013 faces [N, 48, 48] -> the graph's input, as the service builds it for a
    face crop sent with `detect=false`, with the card's test-time views appended."""
    size = model.card.input.size
    crops = np.stack([crop_face(face, whole_image_box(face), WHOLE_IMAGE_CROP, size)
                      for face in faces])
    return model.views(normalize(crops, model.card.input))


class FaceBatches:
    """`onnxruntime.quantization.CalibrationDataReader` over fixed batches of network input,
    with the `set_range` that quantize_static's strided collection uses."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = list(batches)
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self.batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        batch = self.batches[self._next]
        self._next += 1
        return {self.input_name: batch}


def calibration_batches(model: OnnxModel, train: Split, config: QuantizeConfig) -> list[np.ndarray]:
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.permutation(len(train))[: config.faces])
    faces = train.images[chosen]
    return [network_input(model, faces[start : start + CALIBRATION_BATCH])
            for start in range(0, len(faces), CALIBRATION_BATCH)]


def quantize_graph(source: Path, target: Path, input_name: str, batches: Sequence[np.ndarray],
                   config: QuantizeConfig) -> None:
    """Write the int8 graph of `source` to `target`, calibrated on `batches`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    quant_format = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[config.format]
    with tempfile.TemporaryDirectory(prefix="fer-quantize-") as scratch:
        # ONNX Runtime's recommended pre-processing: shape inference and graph folding, so
        # that what is quantized is what it will run.
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared), str(target), FaceBatches(input_name, batches),
            quant_format=quant_format, per_channel=config.per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=method,
            extra_options={"CalibStridedMinMax": 1},  # one batch per collection (see above)
        )


def accuracy_report(probabilities: np.ndarray, split: Split, clean: np.ndarray) -> dict[str, Any]:
    predictions = probabilities.argmax(1)
    return {
        "correct": int((predictions == split.labels).sum()),
        "accuracy": round(float((predictions == split.labels).mean()), 4),
        "clean_accuracy": round(float((predictions[clean] == split.labels[clean]).mean()), 4),
        "ece": round(expected_calibration_error(probabilities, split.labels), 4),
    }


def compare(fp32: OnnxModel, int8: OnnxModel, validation: Split, clean: np.ndarray,
            budget: KeepBudget) -> dict[str, Any]:
    """Both graphs on the whole validation split (the card's TTA and temperature)."""
    # Here, not at the top: train.evaluate pulls in the service's store (FastAPI), which
    # `python -m train fit` must not need (a GPU machine has PyTorch, not the web stack).
    from train.evaluate import classify_faces

    reference = classify_faces([fp32], validation.images)
    quantized = classify_faces([int8], validation.images)
    before = accuracy_report(reference, validation, clean)
    after = accuracy_report(quantized, validation, clean)
    drop = 100.0 * (before["correct"] - after["correct"]) / len(validation)
    agreement = float((reference.argmax(1) == quantized.argmax(1)).mean())
    return {
        "kept": budget.allows(drop, agreement),  # on the exact figures, not the rounded ones
        "validation_accuracy": after["accuracy"],
        "fp32_validation_accuracy": before["accuracy"],
        "drop_points": round(drop, 2),
        "max_drop_points": budget.max_drop_points,
        "min_agreement_top1": budget.min_agreement,
        "clean_validation_accuracy": after["clean_accuracy"],
        "fp32_clean_validation_accuracy": before["clean_accuracy"],
        "clean_count": int(clean.sum()),
        "validation_count": len(validation),
        "ece": after["ece"],
        "fp32_ece": before["ece"],
        "agreement_top1": round(agreement, 4),
        "max_probability_difference": round(float(np.abs(reference - quantized).max()), 4),
        "tta": list(fp32.card.tta),
        "temperature": fp32.card.temperature,
    }


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quantize_version(folder: Path, train: Split, validation: Split, config: QuantizeConfig,
                     budget: KeepBudget = KeepBudget(), write: bool = True) -> dict[str, Any]:
    """Quantize `folder`'s model.onnx, measure it, and (with `write`) keep the int8 file only
    within `budget`, recording the measurement in the card either way."""
    folder = Path(folder)
    fp32 = OnnxModel(folder, ["CPUExecutionProvider"], threads=0, precision="fp32")
    batches = calibration_batches(fp32, train, config)
    target = folder / INT8_FILENAME
    handle, name = tempfile.mkstemp(dir=folder, prefix=f".{INT8_FILENAME}.", suffix=".partial")
    os.close(handle)
    partial = Path(name)
    try:
        quantize_graph(folder / MODEL_FILENAME, partial, fp32.input_name, batches, config)
        int8 = OnnxModel(folder, ["CPUExecutionProvider"], threads=0, precision="int8",
                         int8_graph=partial)
        result = compare(fp32, int8, validation, ~seen_in(validation, train), budget)
        kept = result.pop("kept")
        record = {
            "file": INT8_FILENAME, "kept": kept,
            "sha256": sha256_of(partial) if kept else None,
            "bytes": partial.stat().st_size,
            **result,
            "calibration": {**asdict(config), "faces": min(config.faces, len(train)),
                            "views": sum(len(b) for b in batches), "split": "train",
                            "activations": "uint8", "weights": "int8"},
            "onnxruntime": ort.__version__,
            "commit": git_commit(),
            "kernel": cpu_features.int8_kernel(),
        }
        if write:
            publish(folder, partial, target, record)
    finally:
        partial.unlink(missing_ok=True)
    return record


def check_version(folder: Path, train: Split, validation: Split,
                  budget: KeepBudget = KeepBudget(), write: bool = True) -> dict[str, Any]:
    """Measure `folder`'s kept int8 graph again on validation on this CPU's int8 kernel
    family, and (with `write`) record it in the card's `int8.checks`, which decides whether
    FER_INT8=auto serves it on such CPUs."""
    folder = Path(folder)
    card = ModelCard.read(folder / CARD_FILENAME)
    if card.int8 is None or not card.int8.kept:
        raise SystemExit(f"{folder} has no kept int8 graph: run python -m train quantize first")
    kernel = cpu_features.int8_kernel()
    if kernel == card.int8.kernel:
        raise SystemExit(f"{folder}'s int8 graph was measured on this kernel family ({kernel}) "
                         "when it was made; quantize it again to measure it again")
    fp32 = OnnxModel(folder, ["CPUExecutionProvider"], threads=0, precision="fp32")
    int8 = OnnxModel(folder, ["CPUExecutionProvider"], threads=0, precision="int8")  # sha256
    result = compare(fp32, int8, validation, ~seen_in(validation, train), budget)
    record = {**result, "onnxruntime": ort.__version__, "commit": git_commit()}
    if write:
        card.int8.checks[kernel] = Int8Check.model_validate(record)
        card.write(folder / CARD_FILENAME)
        log.info("%s on %s: %s (%.2f points below fp32, top-1 agreement %.4f)", folder, kernel,
                 "served" if record["kept"] else "not served", record["drop_points"],
                 record["agreement_top1"])
    return {"kernel": kernel, **record}


def publish(folder: Path, partial: Path, target: Path, record: dict[str, Any]) -> None:
    """Card and file in an order in which a reader never sees a kept card without its file
    (the card's sha256 also guards against a stale one)."""
    card = ModelCard.read(folder / CARD_FILENAME)
    card.int8 = Int8Spec.model_validate(record)
    if record["kept"]:
        partial.chmod(0o644)  # mkstemp made it private; it is committed and served like model.onnx
        os.replace(partial, target)
        card.write(folder / CARD_FILENAME)
        log.info("kept %s (%.2f points below fp32)", target, record["drop_points"])
    else:
        card.write(folder / CARD_FILENAME)
        target.unlink(missing_ok=True)
        log.info("not kept: %.2f points below fp32 (budget %.2f), top-1 agreement %.4f "
                 "(at least %.2f); %s removed", record["drop_points"], record["max_drop_points"],
                 record["agreement_top1"], record["min_agreement_top1"], target.name)


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = QuantizeConfig()
    p.add_argument("--model", required=True, help="model_store/<name>/<version> folder")
    p.add_argument("--data", default="../shared/data/fer2013",
                   help="FER2013 folder root or fer2013.csv (train split: calibration; "
                        "validation split: the measurement)")
    p.add_argument("--calibration-faces", dest="faces", type=int, default=defaults.faces,
                   help=OPTION_HELP["faces"])
    p.add_argument("--method", choices=METHODS, default=defaults.method, help=OPTION_HELP["method"])
    p.add_argument("--format", choices=FORMATS, default=defaults.format, help=OPTION_HELP["format"])
    p.add_argument("--per-channel", action="store_true", default=defaults.per_channel,
                   help=OPTION_HELP["per_channel"])
    p.add_argument("--seed", type=int, default=defaults.seed, help=OPTION_HELP["seed"])
    p.add_argument("--max-drop-points", type=float, default=MAX_DROP_POINTS,
                   help="largest loss of validation accuracy, in points, for which the int8 "
                        "file is kept")
    p.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT,
                   help="smallest share of validation faces on which int8 must pick fp32's "
                        "class for the int8 file to be kept")
    p.add_argument("--dry-run", action="store_true",
                   help="measure and print only: leave the card and any int8 file as they are")
    p.add_argument("--check", action="store_true",
                   help="do not quantize: measure the version's kept int8 graph on this CPU's "
                        "int8 kernel family (dot product, or AVX2 without one) and record it "
                        "in the card, so that FER_INT8=auto serves it on such CPUs when it is "
                        "within --max-drop-points and --min-agreement")


def main(args: argparse.Namespace) -> None:
    config = QuantizeConfig(faces=args.faces, method=args.method, format=args.format,
                            per_channel=args.per_channel, seed=args.seed)
    budget = KeepBudget(max_drop_points=args.max_drop_points, min_agreement=args.min_agreement)
    train = load_split(args.data, "train")
    validation = load_split(args.data, "validation")
    if args.check:
        record = check_version(Path(args.model), train, validation, budget,
                               write=not args.dry_run)
    else:
        record = quantize_version(Path(args.model), train, validation, config, budget,
                                  write=not args.dry_run)
    print(json.dumps(record, indent=1))  # noqa: T201
