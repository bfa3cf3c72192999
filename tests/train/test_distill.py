"""train/distill.py: the teacher file, the distillation loss, and a run that learns from it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.model_store import is_version_folder
from tests.conftest import FER_MINI, ROOT
from train.data import load_split
from train.distill import check_distillation, distillation_loss, load_teacher, soften, teach
from train.fit import FitConfig, fit

# The newest committed cnn10, so the test outlives any one version.
TEACHER_MODEL = max(filter(is_version_folder, (ROOT / "model_store" / "cnn10").iterdir()),
                    key=lambda folder: int(folder.name))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "teacher.npz"
    report = teach([TEACHER_MODEL], str(FER_MINI), out)
    assert report["faces"] == len(load_split(FER_MINI, "train", cache_dir=None))
    return out


def test_the_teacher_file_holds_the_models_probabilities_for_each_training_face(teacher_file):
    split = load_split(FER_MINI, "train", cache_dir=None)
    teacher = load_teacher(teacher_file, split)
    assert teacher.members == [str(TEACHER_MODEL)]
    probabilities = teacher.probabilities
    assert probabilities.shape == (len(split), 7)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=5e-3)  # stored as float16
    # A real model, not noise: it agrees with the labels far above chance (1/7).
    assert (probabilities.argmax(1) == split.labels).mean() > 0.4


def test_a_teacher_made_for_other_faces_is_refused(teacher_file):
    validation = load_split(FER_MINI, "validation", cache_dir=None)
    with pytest.raises(ValueError, match="other training faces"):
        load_teacher(teacher_file, validation)


def test_a_file_that_is_not_a_teacher_is_refused(tmp_path):
    split = load_split(FER_MINI, "train", cache_dir=None)
    (tmp_path / "junk.npz").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="not a teacher file"):
        load_teacher(tmp_path / "junk.npz", split)
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="made by `train teach`"):
        load_teacher(tmp_path / "other.npz", split)


def test_weight_zero_is_the_plain_cross_entropy_and_weight_one_only_the_teacher():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 7, generator=generator)
    labels = torch.randint(7, (16,), generator=generator)
    teacher = F.softmax(torch.randn(16, 7, generator=generator), dim=1)
    plain = F.cross_entropy(logits, labels)
    assert torch.allclose(distillation_loss(logits, labels, teacher, 0.0, 2.0), plain)
    # A student that already matches the teacher at temperature T has nothing to learn.
    matching = torch.log(soften(teacher, 2.0)) * 2.0
    nothing_to_learn = distillation_loss(matching, labels, teacher, 1.0, 2.0).item()
    assert nothing_to_learn == pytest.approx(0, abs=1e-5)
    assert distillation_loss(logits, labels, teacher, 1.0, 2.0).item() > 0.01


def test_softening_keeps_the_ranking_and_flattens_the_distribution():
    teacher = torch.tensor([[0.7, 0.2, 0.05, 0.02, 0.01, 0.01, 0.01]])
    soft = soften(teacher, 3.0)
    assert torch.equal(soft.argsort(), teacher.argsort())
    assert soft.max() < teacher.max() and soft.min() > teacher.min()
    assert torch.allclose(soften(teacher, 1.0), teacher, atol=1e-6)


@pytest.mark.parametrize(("weight", "temperature", "mix", "message"), [
    (0.0, 2.0, "none", "distill-weight"), (1.5, 2.0, "none", "distill-weight"),
    (0.5, 0.0, "none", "distill-temperature"), (0.5, 2.0, "mixup", "--mix"),
])
def test_bad_distillation_settings_are_refused(weight, temperature, mix, message):
    with pytest.raises(ValueError, match=message):
        check_distillation("teacher.npz", weight, temperature, mix)
    check_distillation("", weight, temperature, mix)  # no teacher: the settings are unused


def test_a_distilled_run_moves_the_student_towards_the_teacher(tmp_path, teacher_file):
    """Trained on the teacher alone (weight 1), the student agrees with it more after a few
    epochs than it did at the start; the card's recipe names the teacher."""
    split = load_split(FER_MINI, "train", cache_dir=None)
    own_teacher = tmp_path / "teacher.npz"
    shutil.copy(teacher_file, own_teacher)
    targets = torch.from_numpy(load_teacher(own_teacher, split).probabilities)
    cfg = FitConfig(model="cnn10", model_options={"batch_norm": True}, data=str(FER_MINI),
                    run_dir=str(tmp_path / "run"), epochs=6, batch_size=16, lr=0.01, threads=1,
                    augment={"rotation_deg": 0, "scale": 0, "shift": 0, "hflip": False,
                             "erase_p": 0},
                    teacher=str(own_teacher), distill_weight=1.0, distill_temperature=1.0)
    from train.fit import Trainer, predict_logits

    def disagreement(model: torch.nn.Module, spec) -> float:
        logits = torch.from_numpy(predict_logits(model, split.images, spec, torch.device("cpu")))
        return F.kl_div(F.log_softmax(logits, 1), targets, reduction="batchmean").item()

    untrained = Trainer(cfg, tmp_path / "untrained")
    before = disagreement(untrained.model, untrained.spec)
    fit(cfg)
    own_teacher.unlink()  # the card keeps what the run saw, not what the file says later
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    untrained.model.load_state_dict(checkpoint["model"])
    after = disagreement(untrained.model, untrained.spec)
    assert after < 0.7 * before
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert all(np.isfinite(h["train_loss"]) for h in history)

    from train.export import run_record, training_facts

    best = tmp_path / "run" / "best.pt"
    recipe = training_facts(torch.load(best, weights_only=False),
                            run_record(best, torch.load(best, weights_only=False)))["recipe"]
    assert recipe["distillation"] == {"teacher": str(own_teacher),
                                      "teacher_members": [str(TEACHER_MODEL)],
                                      "weight": 1.0, "temperature": 1.0}
