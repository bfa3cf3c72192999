"""Knowledge distillation from exported models (Hinton et al. 2015), offline.

`python -m train teach --model A,B,C --data ... --out runs/teacher.npz` runs the exported
models (the ensemble, as the service would combine them: card TTA, temperatures) once over
the training faces and stores their probabilities. `fit --teacher runs/teacher.npz` then
trains against a blend of the labels and those probabilities:

    loss = (1 - w) * CE(logits, label) + w * T^2 * KL(teacher^(1/T) || softmax(logits / T))

with w = `--distill-weight` and T = `--distill-temperature`. The teacher saw each face
un-augmented while the student sees it augmented; the stored targets stand in for the
teacher's view of the augmented face (the cheap, offline form of distillation). The file
carries the training split's fingerprint, so it is refused for any other data.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train.data import Split, load_split


@dataclass(frozen=True)
class Teacher:
    probabilities: np.ndarray  # float32 [N, 7], in the training split's order
    members: list[str]  # the exported models that made them


def load_teacher(path: str | Path, split: Split) -> Teacher:
    """The teacher file made by `teach` for `split`'s faces."""
    try:
        stored = np.load(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"--teacher {path}: not a teacher file ({error})") from None
    with stored:
        if "probabilities" not in stored or "fingerprint" not in stored:
            raise ValueError(f"--teacher {path}: not a teacher file (made by `train teach`)")
        probabilities = stored["probabilities"].astype(np.float32)
        fingerprint = str(stored["fingerprint"])
        members = [str(m) for m in stored["members"]] if "members" in stored else []
    if fingerprint != split.fingerprint() or probabilities.shape != (len(split), 7):
        raise ValueError(f"--teacher {path}: made for other training faces (fingerprint "
                         f"{fingerprint}, this run's {split.fingerprint()})")
    return Teacher(probabilities, members)


def distillation_record(checkpoint: dict) -> dict:
    """What a card says about a distilled run: the teacher's members as the run saw them,
    the weight and the temperature."""
    config = checkpoint["config"]
    return {"teacher": config["teacher"], "teacher_members": checkpoint.get("teacher_members"),
            "weight": config["distill_weight"], "temperature": config["distill_temperature"]}


def soften(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T): the teacher's distribution at temperature T."""
    return F.softmax(torch.log(probabilities.clamp_min(1e-8)) / temperature, dim=1)


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor,
                      weight: float, temperature: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    hard = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    target = soften(teacher, temperature)
    student = F.log_softmax(logits / temperature, dim=1)
    soft = F.kl_div(student, target, reduction="batchmean") * temperature**2
    return (1.0 - weight) * hard + weight * soft


def check_distillation(teacher: str, weight: float, temperature: float, mix: str) -> None:
    if not teacher:
        return
    if not 0.0 < weight <= 1.0:
        raise ValueError(f"--distill-weight must be in (0, 1] with --teacher, got {weight}")
    if not temperature > 0:
        raise ValueError(f"--distill-temperature must be > 0, got {temperature}")
    if mix != "none":
        raise ValueError("--teacher does not combine with --mix (the targets are per face)")


def teach(folders: list[Path], data: str, out: Path) -> dict:
    from train.evaluate import classify_faces, open_model

    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the teacher file's path (.npz)")
    split = load_split(data, "train")
    models = [open_model(folder) for folder in folders]
    probabilities = classify_faces(models, split.images)
    accuracy = float((probabilities.argmax(1) == split.labels).mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as handle:
        np.savez_compressed(handle, probabilities=probabilities.astype(np.float16),
                            fingerprint=np.asarray(split.fingerprint()),
                            members=np.asarray([str(f) for f in folders]))
    return {"out": str(out), "members": [str(f) for f in folders], "faces": len(split),
            "train_accuracy": round(accuracy, 4),
            "mean_confidence": round(float(probabilities.max(1).mean()), 4)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="model_store/<name>/<version> folder; comma-separate several to teach "
                        "with their ensemble")
    p.add_argument("--data", required=True, help="FER2013 folder root or fer2013.csv")
    p.add_argument("--out", required=True, help="the teacher file (.npz) that fit --teacher reads")


def main(args: argparse.Namespace) -> None:
    report = teach([Path(m) for m in args.model.split(",")], args.data, Path(args.out))
    print(json.dumps(report, indent=1))  # noqa: T201
