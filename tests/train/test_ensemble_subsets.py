"""`train evaluate --subsets`: every ensemble of two or more of the given models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from tests.conftest import COMMITTED_STORE, FER_MINI, ROOT
from train.data import load_split
from train.evaluate import classify_faces, open_model, subset_report

MODELS = [COMMITTED_STORE / name for name in ("cnn10/4", "resnet/6", "resnet-plain/3")]


def test_every_subset_of_two_or_more_is_scored_as_the_service_combines_it():
    split = load_split(FER_MINI, "validation", cache_dir=None)
    seen = np.arange(len(split)) % 2 == 0
    rows = subset_report(MODELS, split, seen_in_training=seen)

    assert sorted(len(row["members"]) for row in rows) == [2, 2, 2, 3]
    assert [row["accuracy"] for row in rows] == sorted((r["accuracy"] for r in rows), reverse=True)
    for row in rows:
        models = [open_model(folder) for folder in row["members"]]
        predictions = classify_faces(models, split.images).argmax(1)
        assert row["accuracy"] == round(float((predictions == split.labels).mean()), 4)
        clean = predictions[~seen] == split.labels[~seen]
        assert row["clean_accuracy"] == round(float(clean.mean()), 4)


def test_subsets_of_fewer_than_three_models_are_refused_before_any_work():
    done = subprocess.run(
        [sys.executable, "-m", "train", "evaluate", "--model", ",".join(map(str, MODELS[:2])),
         "--data", "/nonexistent", "--subsets"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--subsets needs three or more" in done.stderr


def test_mirror_and_subsets_without_a_split_are_refused():
    done = subprocess.run(
        [sys.executable, "-m", "train", "evaluate", "--model", ",".join(map(str, MODELS)),
         "--photos", "/nonexistent", "--mirror"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "give --data" in done.stderr
