"""train/soup.py: weight averaging of fine-tuned runs, BatchNorm measured again, export."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.card import InputSpec, ModelCard
from tests.conftest import FER_MINI, ROOT
from tests.train.test_fit_export import config, export_args
from train.data import load_split
from train.export import load_checkpoint
from train.fit import fit
from train.soup import average, recompute_batch_norm, training_seconds


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A parent run and two fine-tunes of it (other seeds), and an unrelated network."""
    root = tmp_path_factory.mktemp("soup-runs")
    fit(config(root / "parent", epochs=2))
    for seed in (1, 2):
        fit(config(root / f"child{seed}", epochs=1, seed=seed, lr=0.02,
                   init_from=str(root / "parent" / "best.pt")))
    fit(config(root / "other", epochs=1, model="cnn10", model_options={"batch_norm": True}))
    return {p.name: p for p in root.iterdir()}


def train_soup(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", "soup", "--data", str(FER_MINI),
                           "--threads", "1", "--bn-batches", "4", *arguments],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_average_is_the_mean_of_floats_and_keeps_the_first_counter():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    soup = average([a, b])
    torch.testing.assert_close(soup["w"], torch.tensor([2.0, 4.0]))
    assert soup["n"].item() == 5 and soup["w"].dtype == torch.float32


def test_a_runs_best_and_last_checkpoints_count_its_training_time_once():
    checkpoints = {Path("runs/a/best.pt"): {"wall_seconds": 600.0},
                   Path("runs/a/last.pt"): {"wall_seconds": 900.0},
                   Path("runs/b/best.pt"): {"wall_seconds": 500.0},
                   Path("model_store/resnet/4"): {"wall_seconds": 300.0}}
    assert training_seconds(checkpoints) == 900.0 + 500.0 + 300.0


def test_batch_norm_statistics_are_those_of_the_training_faces(runs):
    model, checkpoint = load_checkpoint(runs["child1"] / "best.pt")
    spec = InputSpec(**checkpoint["input_spec"])
    train = load_split(FER_MINI, "train", cache_dir=None)
    first_norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    inputs = []
    handle = first_norm.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    seen = recompute_batch_norm(model, train, spec, batches=100, batch_size=32)
    handle.remove()
    assert seen == len(train) and not model.training
    # Every face seen once with its mirror image, not augmented: the running mean is the
    # mean of the batch means (a cumulative average), whatever the parents' statistics were.
    with torch.no_grad():
        batch_means = torch.stack([batch.mean(dim=(0, 2, 3)) for batch in inputs])
    assert len(inputs) == -(-len(train) // 32) and len(inputs[0]) == 64
    torch.testing.assert_close(first_norm.running_mean, batch_means.mean(dim=0),
                               atol=1e-5, rtol=1e-4)


def test_a_uniform_soup_averages_every_ingredient_and_exports_with_its_record(runs, tmp_path):
    done = train_soup("--checkpoint", str(runs["child1"]), "--checkpoint", str(runs["child2"]),
                      "--out", str(tmp_path / "soup"))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["members"]) == 2
    soup = torch.load(tmp_path / "soup" / "best.pt", weights_only=False)
    one = torch.load(runs["child1"] / "best.pt", weights_only=False)["model"]
    two = torch.load(runs["child2"] / "best.pt", weights_only=False)["model"]
    conv = next(k for k in one if k.endswith("weight") and one[k].ndim == 4)
    torch.testing.assert_close(soup["model"][conv], (one[conv] + two[conv]) / 2)
    record = soup["soup"]
    assert record["method"] == "uniform" and len(record["ingredients"]) == 2
    assert record["validation"] == result["validation"]

    from train.export import main as export

    export(export_args(tmp_path / "soup" / "best.pt", tmp_path / "store"))
    card = ModelCard.read(tmp_path / "store" / "resnet" / "1" / "model.json")
    assert card.training["soup"]["ingredients"][1]["checkpoint"].endswith("child2/best.pt")
    # The card's validation accuracy is the soup's own, measured through ONNX Runtime.
    assert card.metrics["validation"]["accuracy_without_tta"] == pytest.approx(
        record["validation"]["none"], abs=1e-3)


def test_a_greedy_soup_keeps_what_does_not_lower_clean_validation(runs, tmp_path):
    done = train_soup("--greedy", "--select-tta", "none", "--checkpoint", str(runs["child1"]),
                      "--checkpoint", str(runs["child2"]), "--checkpoint", str(runs["parent"]),
                      "--out", str(tmp_path / "soup"))
    assert done.returncode == 0, done.stderr[-2000:]
    record = torch.load(tmp_path / "soup" / "best.pt", weights_only=False)["soup"]
    kept = [i["checkpoint"] for i in record["ingredients"]]
    assert 1 <= len(kept) and len(kept) + len(record["left_out"]) == 3
    alone = [i["val_accuracy_clean"] for i in record["ingredients"]]
    assert record["validation"]["none_clean"] >= 0 and np.isfinite(alone[0])


@pytest.mark.parametrize("which, message", [
    (("child1", "other"), "only one network can be averaged"),
    (("child1",), "at least two checkpoints"),
])
def test_a_soup_of_different_networks_or_of_one_is_refused(runs, tmp_path, which, message):
    arguments = [a for name in which for a in ("--checkpoint", str(runs[name]))]
    done = train_soup(*arguments, "--out", str(tmp_path / "soup"))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_an_exported_version_joins_the_soup_from_its_onnx_weights(runs, tmp_path):
    """The parent the fine-tunes started from, as committed (`model_store/<name>/<version>`),
    is an ingredient on a machine that has no run checkpoint of it."""
    from train.export import main as export

    export(export_args(runs["parent"] / "best.pt", tmp_path / "store"))
    folder = tmp_path / "store" / "resnet" / "1"
    card = ModelCard.read(folder / "model.json")
    done = train_soup("--checkpoint", str(runs["child1"]), "--checkpoint", str(folder),
                      "--out", str(tmp_path / "soup"))
    assert done.returncode == 0, done.stderr[-2000:]
    ingredients = torch.load(tmp_path / "soup" / "best.pt",
                             weights_only=False)["soup"]["ingredients"]
    exported = ingredients[1]
    assert exported["checkpoint"] == str(folder)
    assert exported["epoch"] == card.training["epochs_run"]
    assert exported["val_accuracy_clean"] == card.metrics["validation"]["clean"]["accuracy"]

    first_exported = train_soup("--checkpoint", str(folder), "--checkpoint", str(runs["child1"]),
                                "--out", str(tmp_path / "refused"))
    assert first_exported.returncode == 2 and "must be a run's checkpoint" in first_exported.stderr
