"""`python -m train soup`: one network from the averaged weights of several fine-tuned runs.

Runs warm-started from the same parent (different seeds, regularisers, schedules) stay in
one basin of the loss, where the mean of their weights is often more accurate than any
one of them, at the serving cost of one model ("model soups", Wortsman et al., ICML 2022).
Uniform: every checkpoint given. Greedy (`--greedy`): the ingredients sorted by their own
clean validation accuracy, each kept only if the soup with it is not less accurate on the
clean validation faces, the split models are selected on.

Averaging moves the weights, so BatchNorm's running statistics no longer match them; they
are measured again, as SWA does, on training faces as the service feeds faces: not
augmented, each with its mirror image. (Measured on augmented faces instead, the soup of
cnn10 v3 and two fine-tunes lost 0.8 points of validation accuracy: erasing and warping
shift the statistics away from what inference sees.) The result is a checkpoint that
`train export` takes like a run's `best.pt`, recording its ingredients under `soup`.

An ingredient may also be an exported version, `model_store/<name>/<version>` (its ONNX
weights mapped back to the network, as `fit --init-from` does), so the parent the runs
started from can join the soup on a machine that has only what is committed. The first
ingredient must be a run's checkpoint: it supplies the network's options.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.card import CARD_FILENAME, MODEL_FILENAME, InputSpec, ModelCard
from service.preprocess import normalize
from train.calibrate import probabilities_at
from train.compare import two_view_logits
from train.data import Split, load_split, seen_in
from train.export import build_network, load_checkpoint
from train.onnx_weights import load_onnx_weights
from train.provenance import git_commit

log = logging.getLogger(__name__)


def compatible(checkpoints: list[dict[str, Any]], paths: list[Path]) -> None:
    first = checkpoints[0]
    for path, checkpoint in zip(paths[1:], checkpoints[1:], strict=True):
        for key in ("model_name", "model_args", "input_spec"):
            if checkpoint[key] != first[key]:
                raise ValueError(f"{path}: {key} {checkpoint[key]} differs from "
                                 f"{paths[0]}'s {first[key]}; only one network can be averaged")


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of each floating tensor; integer ones (BatchNorm's batch counter) from the
    first state, since the statistics are measured again anyway."""
    soup = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            soup[key] = (sum(state[key].double() for state in states) / len(states)).to(first.dtype)
        else:
            soup[key] = first.clone()
    return soup


def recompute_batch_norm(model: nn.Module, train: Split, spec: InputSpec, batches: int,
                         batch_size: int = 128, seed: int = 0) -> int:
    """Running means and variances measured again (a cumulative average over batches) on
    `batches` batches of training faces as served: not augmented, each with its mirror
    image (what hflip TTA feeds). Returns the faces seen, mirrors not counted."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).numpy()
    seen = 0
    model.train()
    with torch.no_grad():
        for start in range(0, min(batches * batch_size, len(order)), batch_size):
            faces = train.images[order[start : start + batch_size]]
            both = np.concatenate([faces, faces[:, :, ::-1]])
            model(torch.from_numpy(normalize(np.ascontiguousarray(both), spec)))
            seen += len(faces)
    model.eval()
    return seen


def validation_scores(model: nn.Module, validation: Split, clean: np.ndarray,
                      spec: InputSpec) -> dict[str, float]:
    logits = two_view_logits(model, validation.images, spec)
    scores = {}
    for name, variants in (("none", 1), ("hflip", 2)):
        right = probabilities_at(logits[: len(validation) * variants], variants, 1.0).argmax(1) \
            == validation.labels
        scores[name] = round(float(right.mean()), 4)
        scores[f"{name}_clean"] = round(float(right[clean].mean()), 4)
    return scores


def ingredient_record(path: Path, checkpoint: dict[str, Any]) -> dict[str, Any]:
    config = checkpoint["config"]
    return {
        "checkpoint": str(path), "epoch": checkpoint["epoch"],
        "epochs_total": checkpoint["epoch"] + (checkpoint.get("warm_start") or {}).get("epochs", 0),
        "wall_seconds": round(checkpoint["wall_seconds"], 1), "device": checkpoint["device"],
        "commits": checkpoint.get("commits", [checkpoint.get("commit")]),
        "recipe": {k: config.get(k) for k in ("lr", "seed", "label_smoothing", "mix", "mix_alpha",
                                               "time_budget", "augment", "init_from")},
        "val_accuracy_clean": checkpoint.get("best_accuracy"),
    }


def is_export(path: Path) -> bool:
    return path.is_dir() and (path / CARD_FILENAME).is_file()


def load_export(folder: Path, like: dict[str, Any],
                train: Split) -> tuple[nn.Module, dict[str, Any]]:
    """An exported version as an ingredient: the network built as `like` (a run's
    checkpoint) builds it, its weights read from `model.onnx`, and a checkpoint-like record
    from the card."""
    card = ModelCard.read(folder / CARD_FILENAME)
    training = card.training
    recipe = training.get("recipe", {})
    if training.get("network", card.name) != like["model_name"]:
        raise ValueError(f"{folder}: network {training.get('network', card.name)} differs from "
                         f"{like['model_name']}; only one network can be averaged")
    model = build_network(like)
    faces = normalize(train.images[:1024], card.input)
    load_onnx_weights(model, folder / MODEL_FILENAME, faces)
    config = {**{k: recipe.get(k) for k in ("lr", "seed", "label_smoothing", "time_budget",
                                             "augment")},
              "mix": recipe.get("mix"), "mix_alpha": recipe.get("mix_alpha"),
              "init_from": (training.get("warm_start") or {}).get("checkpoint")}
    record = {
        "config": config, "model_name": like["model_name"], "model_args": like["model_args"],
        "input_spec": card.input.model_dump(), "epoch": training.get("epochs_run", 0),
        "warm_start": training.get("warm_start"), "wall_seconds": training.get("wall_seconds", 0.0),
        "device": training.get("device"), "commits": training.get("commits", []),
        "best_accuracy": card.metrics.get("validation", {}).get("clean", {}).get("accuracy"),
    }
    return model.eval(), record


def training_seconds(checkpoints: dict[Path, dict[str, Any]]) -> float:
    """The training time behind the ingredients: checkpoints of one run (its best.pt and
    last.pt) count once, with the longest of their clocks."""
    by_run: dict[Path, float] = {}
    for path, checkpoint in checkpoints.items():
        run = path.parent if path.suffix == ".pt" else path
        by_run[run] = max(by_run.get(run, 0.0), checkpoint["wall_seconds"])
    return sum(by_run.values())


class Soup:
    def __init__(self, paths: list[Path], data: str, bn_batches: int, selection_tta: str) -> None:
        if is_export(paths[0]):
            raise ValueError(f"{paths[0]}: the first ingredient must be a run's checkpoint "
                             "(it supplies the network's options); put the exported version later")
        self.train = load_split(data, "train")
        first = load_checkpoint(paths[0])
        loaded = [first] + [load_export(path, first[1], self.train) if is_export(path)
                            else load_checkpoint(path) for path in paths[1:]]
        self.paths = paths
        self.checkpoints = [checkpoint for _, checkpoint in loaded]
        compatible(self.checkpoints, paths)
        self.model = loaded[0][0]
        self.states = [model.state_dict() for model, _ in loaded]
        self.spec = InputSpec(**self.checkpoints[0]["input_spec"])
        self.validation = load_split(data, "validation")
        self.clean = ~seen_in(self.validation, self.train)
        self.bn_batches = bn_batches
        self.selection = f"{selection_tta}_clean"

    def score(self, members: list[int]) -> dict[str, float]:
        self.model.load_state_dict(average([self.states[i] for i in members]))
        recompute_batch_norm(self.model, self.train, self.spec, self.bn_batches)
        return validation_scores(self.model, self.validation, self.clean, self.spec)

    def uniform(self) -> tuple[list[int], dict[str, float]]:
        members = list(range(len(self.paths)))
        return members, self.score(members)

    def greedy(self) -> tuple[list[int], dict[str, float]]:
        alone = [self.score([i]) for i in range(len(self.paths))]
        for path, scores in zip(self.paths, alone, strict=True):
            log.info("ingredient %s alone: %s", path, scores)
        ranked = sorted(range(len(self.paths)), key=lambda i: -alone[i][self.selection])
        members, best = [ranked[0]], alone[ranked[0]]
        for candidate in ranked[1:]:
            scores = self.score([*members, candidate])
            kept = scores[self.selection] >= best[self.selection]
            log.info("+ %s: %s (%s)", self.paths[candidate], scores, "kept" if kept else "left out")
            if kept:
                members, best = [*members, candidate], scores
        self.score(members)  # leave the model holding the chosen soup
        return members, best

    def checkpoint(self, members: list[int], scores: dict[str, float],
                   method: str) -> dict[str, Any]:
        """A `best.pt`-like checkpoint of the soup the model holds now. Its `history` is
        the first ingredient's (the curves shown), `wall_seconds` every run's."""
        first = self.checkpoints[members[0]]
        return {
            **{k: first[k] for k in ("config", "model_name", "model_args", "input_spec", "classes",
                                     "history", "device", "data_fingerprint", "warm_start")},
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "epoch": first["epoch"], "best_epoch": first["best_epoch"],
            "best_accuracy": scores[self.selection],
            "wall_seconds": training_seconds({self.paths[i]: self.checkpoints[i] for i in members}),
            "world_size": 1,
            "commit": git_commit(),
            "commits": sorted({c for i in members for c in self.checkpoints[i].get("commits", [])}
                              | {git_commit()}),
            "soup": {
                "method": method, "selection": f"validation accuracy ({self.selection})",
                "batch_norm": f"running statistics measured again on {self.bn_batches} batches "
                              "of training faces and their mirror images, not augmented",
                "validation": scores,
                "ingredients": [ingredient_record(self.paths[i], self.checkpoints[i])
                                for i in members],
                "left_out": [str(self.paths[i]) for i in range(len(self.paths))
                             if i not in members],
            },
        }


def main(args: argparse.Namespace) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    paths = [Path(p) if is_export(Path(p)) else Path(p) / "best.pt" if Path(p).is_dir() else Path(p)
             for p in args.checkpoint]
    for path in paths:
        if not (path.is_file() or is_export(path)):
            raise FileNotFoundError(f"{path}: no such checkpoint")
    if len(paths) < 2:
        raise ValueError("a soup needs at least two checkpoints")
    soup = Soup(paths, args.data, args.bn_batches, args.select_tta)
    members, scores = soup.greedy() if args.greedy else soup.uniform()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(soup.checkpoint(members, scores, "greedy" if args.greedy else "uniform"),
               out / "best.pt")
    print(json.dumps({"checkpoint": str(out / "best.pt"),  # noqa: T201
                      "members": [str(paths[i]) for i in members], "validation": scores}))
