"""`python -m train export`: a checkpoint -> `model_store/<name>/<next version>/`.

Writes `model.onnx` (opset 17, dynamic batch axis, checked with `onnx.checker`, and
compared with PyTorch on real faces to 1e-4), the card `model.json` (validation figures
measured on the exported ONNX model through the service's own pre-processing), and
`curves.png` / `confusion.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.card import CARD_FILENAME, CLASSES, MODEL_FILENAME, FaceCropSpec, InputSpec, ModelCard
from service.model_store import is_version_folder
from service.preprocess import normalize
from train import models
from train.augment import augment_config
from train.checkpoint import read_checkpoint
from train.data import DatasetError, Split, load_split, seen_in
from train.distill import distillation_record
from train.provenance import git_commit

log = logging.getLogger("train.export")

OPSET = 17
PARITY_TOLERANCE = 1e-4


def next_version(store: Path, name: str) -> int:
    folder = store / name
    versions = ([int(p.name) for p in folder.iterdir() if is_version_folder(p)]
                if folder.is_dir() else [])
    return max(versions, default=0) + 1


def export_onnx(model: nn.Module, size: int, path: Path) -> None:
    model = model.eval().to(memory_format=torch.contiguous_format)
    dummy = torch.zeros(2, 1, size, size)
    torch.onnx.export(
        model, (dummy,), str(path), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET, dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def check_parity(model: nn.Module, path: Path, faces: np.ndarray, spec: InputSpec) -> float:
    """Largest |ONNX Runtime - PyTorch| logit difference on `faces`; raises above 1e-4."""
    batch = normalize(faces, spec)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["logits"], {"input": batch})
    difference = float(np.abs(actual - expected).max())
    if difference > PARITY_TOLERANCE:
        raise AssertionError(f"ONNX and PyTorch differ by {difference:.2e} > {PARITY_TOLERANCE}")
    return difference


def architecture_summary(name: str, args: dict[str, Any]) -> str:
    if name == "cnn10":
        bn = " + batch norm" if args.get("batch_norm") else ""
        return ("CNN10 (paper 1, Table 1): conv1x1x32, conv5x5x32, pool, conv3x3x64, pool, "
                f"conv3x3x128 pad 1, pool, FC2048 drop0.6, FC1024 drop0.4, FC7{bn}")
    kind = "improved (PReLU, stride in 3x3, no post-add activation)" if args.get("improved") \
        else "plain (ReLU, stride in first 1x1)"
    return (f"bottleneck ResNet, {kind}: 3x3 stem width {args['width']}, stages "
            f"{list(args['blocks'])} at 48/24/12/6 px, GAP, FC7")


def stage_version(
    model: nn.Module, name: str, store: Path, spec: InputSpec, architecture: str,
    parity_faces: np.ndarray, face_crop: FaceCropSpec | None = None, tta: list[str] | None = None,
    metrics: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
) -> tuple[Path, int]:
    """Export `model` into `store/.staging-<pid>/<name>/<version>`, out of sight of a
    serving store (it skips hidden folders); returns it and its version."""
    version = next_version(store, name)
    staging = store / f".staging-{os.getpid()}" / name / str(version)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        export_onnx(model, spec.size, staging / MODEL_FILENAME)
        difference = check_parity(model, staging / MODEL_FILENAME, parity_faces, spec)
        card = ModelCard(
            name=name, version=version, architecture=architecture, classes=list(CLASSES),
            input=spec, face_crop=face_crop or FaceCropSpec(), tta=tta or [],
            metrics=metrics or {},
            training={**(training or {}), "parameters": models.parameter_count(model),
                      "onnx_opset": OPSET, "onnx_parity_max_abs_diff": difference},
        )
        card.write(staging / CARD_FILENAME)
    except BaseException:
        discard(staging)
        raise
    return staging, version


def discard(staging: Path) -> None:
    shutil.rmtree(staging.parent.parent, ignore_errors=True)


def publish(staging: Path, version: int) -> Path:
    """Move a complete staged version into place in one rename, so a serving store polling
    the folder sees either nothing or the finished version."""
    store, name = staging.parent.parent.parent, staging.parent.name
    folder = store / name / str(version)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, folder)
    except OSError as error:
        raise FileExistsError(f"cannot publish {folder} ({error}); export again") from None
    finally:
        discard(staging)
    return folder


def write_version(
    model: nn.Module, name: str, store: Path, spec: InputSpec, architecture: str,
    parity_faces: np.ndarray, face_crop: FaceCropSpec | None = None, tta: list[str] | None = None,
    metrics: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
) -> Path:
    """Export `model` as the next version of `name` in `store`; returns its folder."""
    staging, version = stage_version(model, name, store, spec, architecture, parity_faces,
                                     face_crop, tta, metrics, training)
    return publish(staging, version)


def build_network(checkpoint: dict[str, Any]) -> nn.Module:
    """The network a checkpoint was trained as, with fresh weights."""
    args = checkpoint["model_args"]
    return models.build(checkpoint["model_name"], **{k: v for k, v in args.items()
                                                     if k not in ("improved",)})


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    checkpoint = read_checkpoint(path, str(path))
    model = build_network(checkpoint)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def run_record(path: Path, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The whole run's record: the run's `last.pt` beside `best.pt` when there is one
    (its history goes past the best epoch), else the checkpoint itself."""
    last = path.parent / "last.pt"
    if path.name != "last.pt" and last.exists():
        return read_checkpoint(last, str(last))
    return checkpoint


def training_facts(checkpoint: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """What the card says about training: `checkpoint` is the exported (best) one, `run`
    the run's latest record."""
    history = run["history"]
    config = checkpoint["config"]
    return {
        "network": checkpoint["model_name"],
        "data": {"source": "FER2013", "train_split": "Training (28,709)",
                 "selection_split": "PublicTest (validation, 3,589)" if config.get(
                     "select_on", "full") == "full" else "PublicTest without the faces "
                     "pixel-identical to a training face (clean validation)",
                 "fingerprints": checkpoint["data_fingerprint"]},
        "recipe": {
            **{k: config[k] for k in ("optimizer", "lr", "momentum", "weight_decay", "schedule",
                                      "warmup_epochs", "batch_size", "label_smoothing",
                                      "precision", "channels_last", "seed", "model_options")},
            **{k: config[k] for k in ("time_budget", "select_on") if config.get(k)},
            **({"mix": config["mix"], "mix_alpha": config["mix_alpha"]}
               if config.get("mix", "none") != "none" else {}),
            **({"distillation": distillation_record(checkpoint)} if config.get("teacher") else {}),
            "augment": asdict(augment_config(config["augment"])),
        },
        "epochs_planned": config["epochs"],
        "epochs_run": run["epoch"],
        "epochs_total": run["epoch"] + (run.get("warm_start") or {}).get("epochs", 0),
        "best_epoch": checkpoint["best_epoch"],
        "device": run["device"],
        "processes": run.get("world_size", 1),
        "wall_seconds": round(run["wall_seconds"], 1),
        **({"paused_seconds_left_out": round(run["paused_seconds"], 1)}
           if run.get("paused_seconds") else {}),
        "seconds_per_epoch": round(float(np.mean([h["seconds"] for h in history])), 1),
        "commits": run.get("commits", [run["commit"]]),
        **({"warm_start": run["warm_start"]} if run.get("warm_start") else {}),
        **({"soup": run["soup"]} if run.get("soup") else {}),
        **({"resumed_from_snapshots": run["resumed_from_snapshots"]}
           if run.get("resumed_from_snapshots") else {}),
        "export_commit": git_commit(),
        "history": history,
    }


def measure_staged(staging: Path, name: str, version: int, val: Split, data: str,
                   history: list[dict[str, Any]], args: argparse.Namespace) -> ModelCard:
    """Validation figures, calibration and plots of a staged version, written into its
    card before it is published."""
    from train.calibrate import calibrate_version
    from train.evaluate import evaluate_photos, evaluate_split, save_confusion_png
    from train.plots import save_curves_png

    train = load_split(data, "train")
    card = ModelCard.read(staging / CARD_FILENAME)
    calibration = calibrate_version(staging, val, train)
    card.temperature = calibration["temperature"]
    card.write(staging / CARD_FILENAME)
    seen = seen_in(val, train)
    report = evaluate_split(staging, val, tta_override=None, seen_in_training=seen)
    report["accuracy_without_tta"] = evaluate_split(staging, val, tta_override=[])["accuracy"]
    report["calibration"] = calibration
    card.metrics = {"validation": report}
    card.write(staging / CARD_FILENAME)
    if args.photos:
        for photos in args.photos.split(","):
            card.metrics.setdefault("natural_photos_by_set", {})[Path(photos).name] = \
                evaluate_photos(staging, Path(photos))
        first = Path(args.photos.split(",")[0]).name
        card.metrics["natural_photos"] = card.metrics["natural_photos_by_set"][first]
        card.write(staging / CARD_FILENAME)
    save_confusion_png(report["confusion"], staging / "confusion.png",
                       title=f"{name} v{version} on FER2013 PublicTest "
                             f"(acc {report['accuracy']:.4f})")
    save_curves_png(history, staging / "curves.png", title=f"{name} v{version}")
    return card


def main(args: argparse.Namespace) -> None:

    model, checkpoint = load_checkpoint(Path(args.checkpoint))
    run = run_record(Path(args.checkpoint), checkpoint)
    name = args.name or checkpoint["model_name"]
    spec = InputSpec(**checkpoint["input_spec"])
    config = checkpoint["config"]
    if getattr(args, "data", None):
        config["data"] = args.data
    try:
        val = load_split(config["data"], "validation")
    except DatasetError as error:
        raise SystemExit("export needs the validation split to measure the model: "
                         f"{error}") from None
    tta = [t for t in args.tta.split(",") if t]
    face_crop = FaceCropSpec(padding=args.padding or 0.0, equalize=args.equalize)
    store = Path(args.store)
    started = time.perf_counter()
    staging, version = stage_version(
        model, name, store, spec,
        architecture_summary(checkpoint["model_name"], checkpoint["model_args"]),
        parity_faces=val.images[:64], face_crop=face_crop, tta=tta,
        training={**training_facts(checkpoint, run), **({"note": args.note} if args.note else {})},
    )
    try:
        card = measure_staged(staging, name, version, val, config["data"], run["history"], args)
    except BaseException:
        discard(staging)
        raise
    folder = publish(staging, version)
    report = card.metrics["validation"]
    log.info("exported %s (val acc %.4f) in %.0fs", folder, report["accuracy"],
             time.perf_counter() - started)
    print(json.dumps({"folder": str(folder), "validation_accuracy": report["accuracy"]}))
