"""`train evaluate --mirror`: each face and its mirror image scored apart."""

from __future__ import annotations

import numpy as np

from tests.conftest import COMMITTED_STORE, FER_MINI
from train.data import Split, load_split
from train.evaluate import mirror_report


def test_mirroring_the_faces_swaps_the_two_views_and_keeps_their_average():
    split = load_split(FER_MINI, "validation", cache_dir=None)
    flipped = Split(np.ascontiguousarray(split.images[:, :, ::-1]), split.labels)
    seen = np.arange(len(split)) % 3 == 0
    model = [COMMITTED_STORE / "cnn10" / "4"]

    report = mirror_report(model, split, seen)
    swapped = mirror_report(model, flipped, seen)

    assert report["count"] == 42 and report["clean"]["count"] == 28
    for view in (report, report["clean"]):
        assert 0.0 < view["agreement_top1"] <= 1.0
        assert 0.0 <= min(view["original"], view["mirrored"], view["averaged"])
    for mine, theirs in ((report, swapped), (report["clean"], swapped["clean"])):
        assert (mine["original"], mine["mirrored"]) == (theirs["mirrored"], theirs["original"])
        assert mine["averaged"] == theirs["averaged"]
        assert mine["agreement_top1"] == theirs["agreement_top1"]


def test_a_mirror_symmetric_set_scores_the_same_in_both_views():
    split = load_split(FER_MINI, "validation", cache_dir=None)
    symmetric = np.concatenate([split.images[:, :, :24], split.images[:, :, :24][:, :, ::-1]], 2)
    report = mirror_report([COMMITTED_STORE / "resnet" / "6"],
                           Split(np.ascontiguousarray(symmetric), split.labels))
    assert report["original"] == report["mirrored"]
    assert report["agreement_top1"] == 1.0
    assert "clean" not in report
