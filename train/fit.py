"""`python -m train fit`: train one network on FER2013 with per-epoch checkpoints.

A run lives in its own folder (`runs/<name>/`): `last.pt` (everything needed to resume),
`best.pt` (best validation accuracy so far), `history.json`, `log.txt` and, with
`--keep-epochs N`, the last N epochs' weights as `epoch-<n>.pt`. Started under
`torchrun`, it trains with DistributedDataParallel (NCCL on GPUs, gloo on CPUs); only
rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from service.card import CARD_FILENAME, CLASSES, MODEL_FILENAME, InputSpec, ModelCard
from service.preprocess import normalize
from train import models
from train.augment import augment, augment_config, equalize_randomly
from train.checkpoint import read_checkpoint, write_checkpoint
from train.data import Split, load_split, seen_in
from train.degrade import degrade_randomly
from train.distill import check_distillation, distillation_loss, load_teacher
from train.environment import Distributed, autocast_dtype, device_description, pick_device
from train.mixing import check_mix, mix_batch, mixed_correct, mixed_cross_entropy
from train.onnx_weights import load_onnx_weights
from train.provenance import git_commit
from train.run_clock import RunClock

log = logging.getLogger("train.fit")


@dataclass
class FitConfig:
    model: str = "cnn10"
    model_options: dict[str, Any] = field(default_factory=dict)
    data: str = "../shared/data/fer2013"
    run_dir: str = ""
    epochs: int = 60
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (Nesterov) | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | plateau
    warmup_epochs: int = 1
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    early_stop_patience: int = 15
    label_smoothing: float = 0.0
    mix: str = "none"  # none | mixup | cutmix
    mix_alpha: float = 1.0  # Beta(alpha, alpha) of the mixing weight
    augment: dict[str, Any] = field(default_factory=dict)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool = True
    threads: int = 0  # torch intra-op threads; 0 = all cores
    subset_per_class: int = 0  # >0: train and validate on a small class-balanced subset
    max_batches_per_epoch: int = 0  # >0: cap (tests and smoke runs)
    seed: int = 0
    init_from: str = ""  # a checkpoint or an exported model_store/<name>/<version> (warm start)
    time_budget: str = ""  # e.g. 150m, 2h, 5400s: cosine decay over that wall time, then stop
    select_on: str = "clean"  # clean | full: validation faces that select the best epoch
    teacher: str = ""  # a `train teach` file: distil from its probabilities
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    keep_epochs: int = 0  # >0: each of the last N epochs' weights kept as epoch-<n>.pt

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FitConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown fit option(s) {sorted(unknown)}")
        return cls(**values)


OPTION_HELP: dict[str, str] = {
    "model": "network: cnn10, resnet or resnet-plain",
    "data": "FER2013: a folder root (<split>/<class>/*.jpg) or fer2013.csv",
    "run_dir": "folder for last.pt, best.pt, history.json and log.txt ('' = runs/<model>)",
    "epochs": "most epochs this run may train (with --time-budget, an upper bound)",
    "batch_size": "faces per SGD step (per process under torchrun)",
    "optimizer": "sgd (Nesterov momentum) or adamw",
    "lr": "peak learning rate, reached after the warm-up",
    "momentum": "SGD momentum",
    "weight_decay": "L2 weight decay on conv and dense weights (never biases, BN or PReLU)",
    "schedule": "cosine (decay to 0 over --epochs, or over --time-budget) or plateau "
                "(ReduceLROnPlateau on the selection accuracy)",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "plateau_patience": "plateau schedule: epochs without improvement before the rate drops",
    "plateau_factor": "plateau schedule: factor applied to the rate at each drop",
    "early_stop_patience": "stop after this many epochs without a better selection accuracy",
    "label_smoothing": "label smoothing of the cross-entropy loss",
    "mix": "blend each batch with a shuffled copy of itself: none, mixup (pixels) or "
           "cutmix (a pasted rectangle); the loss blends the two labels alike",
    "mix_alpha": "mixup/cutmix: the mixing weight is drawn from Beta(alpha, alpha) once "
                 "per batch (0.2-0.4 is usual for mixup, 1.0 for cutmix)",
    "precision": "auto (fp16 on GPUs, fp32 on CPUs), fp32, bf16 (CPUs with native bf16) or fp16",
    "channels_last": "channels-last memory layout (faster convolutions on CPUs)",
    "threads": "torch intra-op threads; 0 = all cores",
    "subset_per_class": "train and validate on at most this many faces per class (0 = all)",
    "max_batches_per_epoch": "cap on steps per epoch, for smoke runs and tests (0 = none)",
    "seed": "seed of the initial weights and of each epoch's shuffling and augmentation",
    "init_from": "warm start from a run's checkpoint (.pt) or an exported version folder "
                 "(model_store/<name>/<version>); a fresh optimiser and schedule",
    "time_budget": "wall time this run may take, e.g. 150m, 2h, 5400s, not counting time "
                   "the process is stopped (kill -STOP); the cosine schedule decays to 0 over "
                   "it and the run stops when it is spent ('' = none)",
    "select_on": "validation faces that pick the best epoch: clean (those not pixel-identical "
                 "to a training face) or full",
    "teacher": "teacher probabilities from `python -m train teach` (.npz): the loss blends "
               "the labels with them ('' = no distillation)",
    "distill_weight": "with --teacher: weight of the distillation term (the labels get 1 - w)",
    "distill_temperature": "with --teacher: temperature T of teacher and student in the "
                           "distillation term (scaled by T^2)",
    "keep_epochs": "keep the weights of each of the last N epochs as epoch-<n>.pt in the run "
                   "folder (no optimiser state), older ones deleted, for a tail soup with "
                   "`train soup` (0 = none)",
}


def parse_duration(text: str) -> float:
    """`150m`, `2h`, `90s` or plain seconds -> seconds; empty -> 0 (no budget)."""
    text = text.strip().lower()
    if not text:
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except ValueError:
        raise ValueError(f"--time-budget {text!r}: expected e.g. 150m, 2h or 5400s") from None
    if seconds <= 0:
        raise ValueError(f"--time-budget {text!r} must be positive")
    return seconds


def input_spec_for(train_split: Split, size: int) -> InputSpec:
    pixels = train_split.images.astype(np.float64) / 255.0
    return InputSpec(size=size, mean=round(float(pixels.mean()), 4),
                     std=round(float(pixels.std()), 4))


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: np.ndarray, spec: InputSpec, device: torch.device,
    batch_size: int = 512,
) -> np.ndarray:
    """Logits for uint8 faces [N, 48, 48], pre-processed exactly as the service does."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(normalize(images[start : start + batch_size], spec)).to(device)
        logits = model(batch).float()
        outputs.append(logits.cpu().numpy())
    return np.concatenate(outputs)


class Trainer:
    def __init__(self, config: FitConfig, run_dir: Path) -> None:
        if config.select_on not in ("clean", "full"):
            raise ValueError(f"--select-on must be clean or full, not {config.select_on!r}")
        if config.keep_epochs < 0:
            raise ValueError(f"--keep-epochs must be 0 or more, not {config.keep_epochs}")
        check_mix(config.mix, config.mix_alpha)
        check_distillation(config.teacher, config.distill_weight, config.distill_temperature,
                           config.mix)
        self.augment_config = augment_config(config.augment)
        self.config = config
        self.run_dir = run_dir
        self.device = pick_device()
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.dist = Distributed.from_env(self.device)
        self.amp_dtype = autocast_dtype(config.precision, self.device)

        train_split = load_split(config.data, "train")
        val_split = load_split(config.data, "validation")
        if config.subset_per_class:
            train_split = train_split.subset(config.subset_per_class, config.seed)
            val_split = val_split.subset(max(config.subset_per_class // 4, 8), config.seed)
        self.train_split, self.val_split = train_split, val_split
        # FER2013 repeats faces across splits; a face seen in training says nothing about
        # generalisation, so selection (by default) ignores those validation faces.
        self.val_seen = seen_in(val_split, train_split)
        self.teacher: torch.Tensor | None = None
        self.teacher_members: list[str] | None = None
        if config.teacher:
            teacher = load_teacher(config.teacher, train_split)
            self.teacher = torch.from_numpy(teacher.probabilities)
            self.teacher_members = teacher.members
        self.budget_seconds = parse_duration(config.time_budget)
        self.spec = input_spec_for(train_split, size=48)

        torch.manual_seed(config.seed)
        self.model = models.build(config.model, **config.model_options).to(self.device)
        self.warm_start: dict[str, Any] | None = None
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net: nn.Module = self.model
        if self.dist.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = self._steps_per_epoch()
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=config.plateau_factor,
            patience=config.plateau_patience,
        )
        self.scaler = torch.amp.GradScaler(enabled=self.amp_dtype == torch.float16)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best_accuracy = -1.0
        self.best_epoch = 0
        self.wall_seconds = 0.0  # training time: a stopped process's pauses left out
        self.paused_seconds = 0.0
        self.clock = RunClock()
        self.commits = [git_commit()]  # the code of each start and resume
        self.snapshots: list[dict[str, Any]] = []  # resumes from a `train snapshot`

    # -- setup ---------------------------------------------------------------------------
    def start_from(self, path: str) -> None:
        """Warm start: load another run's weights (not its optimiser or schedule) and keep
        what the card must say about that parent run."""
        if Path(path).is_dir():
            self._start_from_export(Path(path))
            return
        parent = read_checkpoint(path, f"--init-from {path}")
        wanted = models.config_dict(self.config.model, **self.config.model_options)
        if parent.get("model_args") != wanted:
            raise ValueError(f"--init-from {path}: network {parent.get('model_args')} "
                             f"is not this run's {wanted}")
        self.model.load_state_dict(parent["model"])
        self.warm_start = {"checkpoint": path,
                "epochs": parent["epoch"] + (parent.get("warm_start") or {}).get("epochs", 0),
                "wall_seconds": round(parent["wall_seconds"], 1),
                "val_accuracy": parent["best_accuracy"], "device": parent["device"],
                "commits": parent.get("commits", [parent["commit"]]),
                "warm_start": parent.get("warm_start")}

    def _start_from_export(self, folder: Path) -> None:
        """Warm start from an exported version (`model.onnx` + card), as committed."""
        try:
            card = ModelCard.read(folder / CARD_FILENAME)
        except (OSError, ValueError) as error:
            raise ValueError(f"--init-from {folder}: no readable model card ({error})") from None
        recipe = card.training.get("recipe", {})
        parent_name = card.training.get("network", card.name)
        if (parent_name != self.config.model
            or recipe.get("model_options") != self.config.model_options):
            raise ValueError(f"--init-from {folder}: network {parent_name} "
                             f"{recipe.get('model_options')} is not this run's "
                             f"{self.config.model} {self.config.model_options}")
        faces = normalize(self.train_split.images[:1024], card.input)
        self.model.to(memory_format=torch.contiguous_format)
        difference = load_onnx_weights(self.model, folder / MODEL_FILENAME, faces)
        if self.config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        training = card.training
        self.warm_start = {
            "checkpoint": str(folder), "onnx_parity_max_abs_diff": difference,
            "epochs": training.get("epochs_run", 0)
                      + (training.get("warm_start") or {}).get("epochs", 0),
            "wall_seconds": training.get("wall_seconds", 0.0),
            "val_accuracy": card.metrics.get("validation", {}).get("accuracy"),
            "device": training.get("device"), "commits": training.get("commits", []),
            "warm_start": training.get("warm_start")}

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        decay, no_decay = [], []
        for param in self.model.parameters():
            (no_decay if param.ndim <= 1 else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": c.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=True)
        if c.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=c.lr)
        raise ValueError(f"unknown optimizer {c.optimizer!r}")

    def _steps_per_epoch(self) -> int:
        per_rank = len(self.train_split) // self.dist.world_size
        steps = max(per_rank // self.config.batch_size, 1)
        if self.config.max_batches_per_epoch:
            steps = min(steps, self.config.max_batches_per_epoch)
        return steps

    def _lr_at(self, step: int, elapsed: float = 0.0) -> float:
        c = self.config
        if self.budget_seconds and c.schedule == "cosine":
            # Decay over wall time, so the rate reaches zero when the budget is spent,
            # however fast the machine turns out to be.
            warm = c.warmup_epochs * self.steps_per_epoch
            if step < warm:
                return c.lr * (step + 1) / warm
            progress = min(elapsed / self.budget_seconds, 1.0)
            return c.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if c.schedule == "plateau":
            base = self.optimizer.param_groups[0]["lr"]
            warm = c.warmup_epochs * self.steps_per_epoch
            return c.lr * min(1.0, (step + 1) / warm) if step < warm else base
        warm = c.warmup_epochs * self.steps_per_epoch
        total = c.epochs * self.steps_per_epoch
        if step < warm:
            return c.lr * (step + 1) / warm
        progress = (step - warm) / max(total - warm, 1)
        return c.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    # -- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "model_name": self.config.model,
            "model_args": models.config_dict(self.config.model, **self.config.model_options),
            "input_spec": self.spec.model_dump(),
            "classes": list(CLASSES),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "plateau": self.plateau.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "best_accuracy": self.best_accuracy,
            "best_epoch": self.best_epoch,
            "wall_seconds": self.wall_seconds,
            "paused_seconds": self.paused_seconds,
            "device": device_description(self.device),
            "world_size": self.dist.world_size,
            "data_fingerprint": {
                "train": self.train_split.fingerprint(),
                "validation": self.val_split.fingerprint(),
            },
            "commit": self.commits[-1],
            "commits": self.commits,
            "warm_start": self.warm_start,
            **({"resumed_from_snapshots": self.snapshots} if self.snapshots else {}),
            **({"teacher_members": self.teacher_members} if self.teacher is not None else {}),
        }

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])  # float16 snapshots widen here
        if checkpoint["optimizer"] is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        else:
            log.info("the checkpoint is a snapshot without optimiser state: momentum restarts")
        self.snapshots = list(checkpoint.get("resumed_from_snapshots", []))
        if "snapshot" in checkpoint:
            snapshot = checkpoint["snapshot"]
            self.snapshots.append({k: snapshot[k] for k in ("epoch", "weights", "optimizer")})
        self.plateau.load_state_dict(checkpoint["plateau"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch = checkpoint["epoch"]
        self.history = checkpoint["history"]
        self.best_accuracy = checkpoint["best_accuracy"]
        self.best_epoch = checkpoint["best_epoch"]
        self.wall_seconds = checkpoint["wall_seconds"]
        self.paused_seconds = checkpoint.get("paused_seconds", 0.0)
        self.warm_start = checkpoint.get("warm_start")
        earlier = checkpoint.get("commits", [checkpoint["commit"]])
        self.commits = earlier + [c for c in self.commits if c != earlier[-1]]

    def _save(self, name: str) -> None:
        write_checkpoint(self.state(), self.run_dir / name)

    def _keep_epoch(self) -> None:
        """This epoch's weights as epoch-<n>.pt; only the newest `keep_epochs` stay."""
        write_checkpoint({**self.state(), "optimizer": None},
                         self.run_dir / f"epoch-{self.epoch:04d}.pt")
        kept = sorted((p for p in self.run_dir.glob("epoch-*.pt")
                       if p.stem.removeprefix("epoch-").isdigit()),
                      key=lambda p: int(p.stem.removeprefix("epoch-")))
        for old in kept[: -self.config.keep_epochs]:
            old.unlink()

    # -- loop ----------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        c = self.config
        self.net.train()
        generator = torch.Generator().manual_seed(c.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.train_split), generator=generator).numpy()
        per_rank = len(order) // self.dist.world_size
        order = order[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]
        labels_all = torch.from_numpy(self.train_split.labels)
        total_loss = total_correct = total_seen = 0.0
        bar = tqdm(range(self.steps_per_epoch), disable=not self.dist.is_main, leave=False,
                   desc=f"epoch {self.epoch + 1}/{c.epochs}", mininterval=5.0)
        epoch_started = self.clock.now()
        for step in bar:
            global_step = self.epoch * self.steps_per_epoch + step
            lr = self._lr_at(global_step, self.wall_seconds + self.clock.now() - epoch_started)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            index = order[step * c.batch_size : (step + 1) * c.batch_size]
            # Served crops come from photos (blurred, JPEG-compressed, lit otherwise) and
            # are equalised when the card says so; training can see such faces too.
            faces = degrade_randomly(self.train_split.images[index], self.augment_config,
                                     generator)
            faces = equalize_randomly(faces, self.augment_config.equalize_p, generator)
            images = torch.from_numpy(normalize(faces, self.spec))
            images = augment(images.to(self.device), self.augment_config, generator)
            if c.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels_all[index].to(self.device)
            batch = mix_batch(images, labels, c.mix, c.mix_alpha, generator)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                logits = self.net(batch.images)
                if self.teacher is None:
                    loss = mixed_cross_entropy(logits.float(), batch, c.label_smoothing)
                else:
                    loss = distillation_loss(
                        logits.float(), labels, self.teacher[index].to(self.device),
                        c.distill_weight, c.distill_temperature, c.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {self.epoch + 1}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total_loss += loss.item() * len(index)
            total_correct += mixed_correct(logits, batch)
            total_seen += len(index)
            bar.set_postfix(refresh=False, loss=f"{total_loss / total_seen:.3f}",
                            acc=f"{total_correct / total_seen:.3f}", lr=f"{lr:.4f}")
        return {"train_loss": total_loss / total_seen, "train_accuracy": total_correct / total_seen,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def validate(self) -> dict[str, float]:
        logits = predict_logits(self.model, self.val_split.images, self.spec, self.device)
        labels = self.val_split.labels
        loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
        right = logits.argmax(1) == labels
        return {"val_loss": loss, "val_accuracy": float(right.mean()),
                "val_clean_accuracy": float(right[~self.val_seen].mean()) if (~self.val_seen).any()
                else float(right.mean())}

    def close(self) -> None:
        self.clock.close()
        self.dist.close()

    def selection_metric(self, metrics: dict[str, float]) -> float:
        key = "val_clean_accuracy" if self.config.select_on == "clean" else "val_accuracy"
        return metrics[key]

    def budget_left(self) -> bool:
        if not self.budget_seconds or not self.history:
            return True
        typical = float(np.median([h["seconds"] for h in self.history[-5:]]))
        return self.wall_seconds + 0.5 * typical < self.budget_seconds

    def run(self) -> dict[str, Any]:
        c = self.config
        stale = self.epoch - self.best_epoch
        # A stop between epochs (while a checkpoint is written) is booked to the next epoch.
        paused_mark = self.clock.paused_seconds
        while self.epoch < c.epochs and stale < c.early_stop_patience and self.budget_left():
            started = self.clock.now()
            metrics = self.train_epoch()
            metrics.update(self.validate())
            seconds = self.clock.now() - started
            paused_now = self.clock.paused_seconds
            paused, paused_mark = paused_now - paused_mark, paused_now
            self.wall_seconds += seconds
            self.paused_seconds += paused
            self.epoch += 1
            score = self.selection_metric(metrics)
            if c.schedule == "plateau":
                self.plateau.step(score)
            improved = score > self.best_accuracy
            if improved:
                self.best_accuracy, self.best_epoch = score, self.epoch
            stale = self.epoch - self.best_epoch
            record = {"epoch": self.epoch, "seconds": round(seconds, 1), **metrics}
            stopped = paused >= 0.1  # below: the watchdog's rounding, not a stop
            if stopped:
                record["paused_seconds"] = round(paused, 1)
            self.history.append(record)
            if self.dist.is_main:
                self._save("last.pt")
                if improved:
                    self._save("best.pt")
                if c.keep_epochs > 0:
                    self._keep_epoch()
                (self.run_dir / "history.json").write_text(json.dumps(self.history, indent=1))
                log.info(
                    "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f "
                    "(clean %.4f)  lr %.5f  %.0fs%s%s",
                    self.epoch, c.epochs, metrics["train_loss"], metrics["train_accuracy"],
                    metrics["val_loss"], metrics["val_accuracy"], metrics["val_clean_accuracy"],
                    metrics["lr"], seconds, f" (+{paused:.0f}s stopped)" if stopped else "",
                    "  *best*" if improved else "",
                )
        if stale >= c.early_stop_patience and self.dist.is_main:
            log.info("early stop: no val improvement for %d epochs", stale)
        if not self.budget_left() and self.dist.is_main:
            log.info("time budget %s spent after %.0f s", c.time_budget, self.wall_seconds)
        return {"best_accuracy": self.best_accuracy, "best_epoch": self.best_epoch,
                "epochs": self.epoch, "wall_seconds": self.wall_seconds}


RESUME_MAY_CHANGE = ("epochs", "early_stop_patience", "time_budget", "threads", "data",
                     "keep_epochs")


def fit(config: FitConfig, resume: bool | str = False,
        given: set[str] | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `config.run_dir`; returns the best validation figures.

    `resume=True` continues from the run folder's last.pt; a path continues from that
    checkpoint or snapshot (`train snapshot`) in a run folder that has none yet. A resumed
    run keeps its own settings except those of RESUME_MAY_CHANGE that `given` names (the
    command line's options; None = all of them, from `config`)."""
    run_dir = Path(config.run_dir or f"runs/{config.model}")
    last = run_dir / "last.pt"
    checkpoint = None
    if resume == "":
        raise ValueError("--resume: empty path (name a checkpoint or snapshot, or give none)")
    if isinstance(resume, str) and last.exists():
        raise FileExistsError(f"{run_dir} already has a run; --resume without a file "
                              "continues it, or pass another --run-dir")
    if resume:
        source = Path(resume) if isinstance(resume, str) else last
        if not source.exists():
            raise FileNotFoundError(f"nothing to resume: {source} does not exist")
        checkpoint = read_checkpoint(source, f"--resume {source}")
        saved = FitConfig.from_dict(checkpoint["config"])
        # Only the budget and early stopping may change on resume; the recipe may not.
        for name in RESUME_MAY_CHANGE:
            named = given is None or name in given
            if named and (name != "time_budget" or config.time_budget):  # '' keeps the run's
                setattr(saved, name, getattr(config, name))
        config = saved
    elif last.exists():
        raise FileExistsError(f"{run_dir} already has a run; pass --resume or another --run-dir")
    config.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _log_to(run_dir / "log.txt")
    trainer = Trainer(config, run_dir)
    try:  # closes the clock's thread on a refusal too
        if checkpoint is not None:
            saved_data = checkpoint.get("data_fingerprint", {})
            this_data = {"train": trainer.train_split.fingerprint(),
                         "validation": trainer.val_split.fingerprint()}
            if saved_data and saved_data != this_data:
                raise ValueError(f"--resume: {run_dir} was trained on other data (fingerprints "
                                 f"{saved_data}, --data {config.data} gives {this_data})")
            trainer.load(checkpoint)
            log.info("resumed %s at epoch %d (best val %.4f) from %s", run_dir, trainer.epoch,
                     trainer.best_accuracy, source)
        else:
            if config.init_from:
                trainer.start_from(config.init_from)
                log.info("warm start from %s (epoch %d, val %.4f)", config.init_from,
                         trainer.warm_start["epochs"], trainer.warm_start["val_accuracy"])
            log.info("training %s on %s (%d train / %d val) on %s, %d process(es)", config.model,
                     config.data, len(trainer.train_split), len(trainer.val_split),
                     device_description(trainer.device), trainer.dist.world_size)
        return trainer.run()
    finally:
        trainer.close()


def _log_to(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("train").addHandler(handler)
