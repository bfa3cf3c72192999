"""The learning-rate schedule (`Trainer._lr_at`) and the no-weight-decay parameter groups."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import FER_MINI
from train.fit import FitConfig, Trainer

LR = 0.05
BATCH = 16  # FER_MINI has 84 training faces: 5 steps per epoch


def trainer(tmp_path: Path, **overrides) -> Trainer:
    values = dict(model="resnet", model_options={"width": 4, "blocks": [1, 1, 1, 1]},
                  data=str(FER_MINI), run_dir=str(tmp_path), epochs=10, batch_size=BATCH,
                  lr=LR, warmup_epochs=2, threads=1)
    values.update(overrides)
    return Trainer(FitConfig(**values), tmp_path)


# -- cosine over epochs -----------------------------------------------------------------
def test_the_warm_up_rises_linearly_to_the_peak(tmp_path):
    t = trainer(tmp_path)
    warm = 2 * t.steps_per_epoch
    assert t.steps_per_epoch == 84 // BATCH
    rates = [t._lr_at(step) for step in range(warm)]
    assert rates == pytest.approx([LR * (step + 1) / warm for step in range(warm)])
    assert rates[-1] == pytest.approx(LR)


def test_cosine_decays_from_the_peak_to_zero_at_the_last_step(tmp_path):
    t = trainer(tmp_path)
    warm, total = 2 * t.steps_per_epoch, 10 * t.steps_per_epoch
    assert t._lr_at(warm) == pytest.approx(LR)
    assert t._lr_at((warm + total) // 2) == pytest.approx(LR / 2, rel=0.05)
    assert t._lr_at(total) == pytest.approx(0, abs=1e-12)
    assert t._lr_at(total + 7) == pytest.approx(0, abs=1e-12)  # never negative, never back up
    after = [t._lr_at(step) for step in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    middle = warm + (total - warm) // 4
    expected = LR * 0.5 * (1 + math.cos(math.pi * (middle - warm) / (total - warm)))
    assert t._lr_at(middle) == pytest.approx(expected)


def test_capped_epochs_stretch_the_schedule_over_the_steps_run(tmp_path):
    t = trainer(tmp_path, max_batches_per_epoch=2)
    assert t.steps_per_epoch == 2
    assert t._lr_at(2 * 2 - 1) == pytest.approx(LR)
    assert t._lr_at(10 * 2) == pytest.approx(0, abs=1e-12)


def test_no_warm_up_starts_at_the_peak(tmp_path):
    t = trainer(tmp_path, warmup_epochs=0)
    assert t._lr_at(0) == pytest.approx(LR)


# -- cosine over a wall-time budget -------------------------------------------------------
def test_with_a_time_budget_the_rate_follows_the_time_spent_not_the_step(tmp_path):
    t = trainer(tmp_path, time_budget="10m")
    warm = 2 * t.steps_per_epoch
    assert t._lr_at(0, elapsed=0) == pytest.approx(LR / warm)  # the warm-up still counts steps
    for step in (warm, warm + 3, 1000):
        assert t._lr_at(step, elapsed=0) == pytest.approx(LR)
        assert t._lr_at(step, elapsed=300) == pytest.approx(LR / 2)
        assert t._lr_at(step, elapsed=150) == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi / 4)))
        assert t._lr_at(step, elapsed=600) == pytest.approx(0, abs=1e-12)
        assert t._lr_at(step, elapsed=5000) == pytest.approx(0, abs=1e-12)


def test_a_time_budget_with_the_plateau_schedule_is_the_plateau_schedule(tmp_path):
    t = trainer(tmp_path, time_budget="10m", schedule="plateau")
    warm = 2 * t.steps_per_epoch
    assert t._lr_at(warm, elapsed=600) == pytest.approx(LR)  # no wall-time decay


# -- plateau --------------------------------------------------------------------------
def test_plateau_warms_up_then_follows_the_rate_the_plateau_scheduler_set(tmp_path):
    t = trainer(tmp_path, schedule="plateau", plateau_patience=0, plateau_factor=0.5)
    warm = 2 * t.steps_per_epoch
    assert t._lr_at(0) == pytest.approx(LR / warm)
    for group in t.optimizer.param_groups:
        group["lr"] = LR  # as the training loop sets it
    assert t._lr_at(warm) == pytest.approx(LR)
    t.plateau.step(0.5)
    t.plateau.step(0.4)  # no improvement, patience 0: the rate halves
    assert t._lr_at(warm + 1) == pytest.approx(LR / 2)
    assert t._lr_at(0) == pytest.approx(LR / warm)  # the warm-up is unchanged


# -- weight decay ---------------------------------------------------------------------
NO_DECAY_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU)


@pytest.mark.parametrize(("model", "options"), [
    ("resnet", {"width": 4, "blocks": [1, 1, 1, 1]}),
    ("cnn10", {"batch_norm": True}),
])
def test_weight_decay_applies_to_conv_and_dense_weights_only(tmp_path, model, options):
    t = trainer(tmp_path, model=model, model_options=options, weight_decay=5e-4)
    decayed, exempt = set(), set()
    for module in t.model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.Conv2d | nn.Linear) and name == "weight":
                decayed.add(param)
            else:
                assert isinstance(module, NO_DECAY_TYPES) or name == "bias", (module, name)
                exempt.add(param)
    assert decayed and exempt
    if model == "resnet":
        assert any(isinstance(m, nn.PReLU) for m in t.model.modules())
    groups = {group["weight_decay"]: set(group["params"]) for group in t.optimizer.param_groups}
    assert groups == {5e-4: decayed, 0.0: exempt}

    # And it acts so: one step without gradients shrinks only the decayed weights.
    before = {param: param.detach().clone() for param in t.model.parameters()}
    for param in t.model.parameters():
        param.grad = torch.zeros_like(param)
    t.optimizer.step()
    for param, old in before.items():
        moved = not torch.equal(param.detach(), old)
        assert moved == (param in decayed and bool(old.abs().sum() > 0))


def test_adamw_gets_the_same_groups(tmp_path):
    t = trainer(tmp_path, optimizer="adamw", weight_decay=0.01)
    assert isinstance(t.optimizer, torch.optim.AdamW)
    assert sorted(group["weight_decay"] for group in t.optimizer.param_groups) == [0.0, 0.01]
