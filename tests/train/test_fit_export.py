"""Short real runs on the committed FER2013 mini-set: fit, resume, DDP, export, evaluate."""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from service.card import CLASSES, ModelCard
from tests.conftest import FACES, FER_MINI, ROOT
from train.data import load_split
from train.fit import FitConfig, fit

NO_AUGMENT = {"rotation_deg": 0, "scale": 0, "shift": 0, "hflip": False, "erase_p": 0}


def config(run_dir: Path, **overrides) -> FitConfig:
    values = dict(model="resnet", model_options={"width": 4, "blocks": [1, 1, 1, 1]},
                  data=str(FER_MINI), run_dir=str(run_dir), epochs=2, batch_size=16, lr=0.05,
                  threads=1, augment=dict(NO_AUGMENT))
    values.update(overrides)
    return FitConfig(**values)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    fit(config(run_dir, epochs=2))
    return run_dir


def test_a_short_fit_lowers_the_training_loss(tmp_path):
    cfg = config(tmp_path, model="cnn10", model_options={"batch_norm": True}, epochs=6, lr=0.01)
    fit(cfg)
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == 6
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert {"best.pt", "last.pt", "log.txt"} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_a_mixed_run_trains_and_its_card_names_the_mix(tmp_path, mix):
    run_dir = tmp_path / "run"
    fit(config(run_dir, epochs=2, mix=mix, mix_alpha=0.4))
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)
    from train.export import run_record, training_facts

    best = run_dir / "best.pt"
    checkpoint = torch.load(best, weights_only=False)
    recipe = training_facts(checkpoint, run_record(best, checkpoint))["recipe"]
    assert recipe["mix"] == mix and recipe["mix_alpha"] == 0.4


def test_a_run_on_degraded_faces_trains_and_its_card_records_the_degradations(tmp_path):
    run_dir = tmp_path / "run"
    degradations = {"blur_p": 0.5, "jpeg_p": 0.5, "tone_p": 0.5, "jpeg_quality": [30, 60]}
    fit(config(run_dir, epochs=2, augment={**NO_AUGMENT, **degradations}))
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)
    from train.export import run_record, training_facts

    best = run_dir / "best.pt"
    checkpoint = torch.load(best, weights_only=False)
    augment = training_facts(checkpoint, run_record(best, checkpoint))["recipe"]["augment"]
    assert augment["blur_p"] == 0.5 and augment["jpeg_quality"] == [30, 60]


def test_compare_scores_each_arm_as_the_checkpoint_predicts(trained_run, tmp_path):
    from service.card import InputSpec
    from train.export import load_checkpoint
    from train.fit import predict_logits

    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, "-m", "train", "compare", "--run", str(trained_run), "--run",
         str(trained_run / "last.pt"), "--data", str(FER_MINI), "--threads", "1",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| val hflip |" in done.stdout and str(trained_run) in done.stdout
    best, last = json.loads(out.read_text())
    model, checkpoint = load_checkpoint(trained_run / "best.pt")
    validation = load_split(FER_MINI, "validation", cache_dir=None)
    logits = predict_logits(model, validation.images, InputSpec(**checkpoint["input_spec"]),
                            torch.device("cpu"))
    expected = float((logits.argmax(1) == validation.labels).mean())
    assert best["none"]["accuracy"] == pytest.approx(expected, abs=1e-4)
    assert best["epoch"] == checkpoint["epoch"] and last["epoch"] == 2
    for row in (best, last):
        for view in ("none", "hflip"):
            assert 0 <= row[view]["ece_after"] <= 1 and row[view]["temperature"] > 0


def test_resume_continues_where_the_run_stopped(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = torch.load(run / "last.pt", weights_only=False)
    assert before["epoch"] == 2
    result = fit(config(run, epochs=3), resume=True)
    after = torch.load(run / "last.pt", weights_only=False)
    assert after["epoch"] == 3 and result["epochs"] == 3
    assert [h["epoch"] for h in after["history"]] == [1, 2, 3]
    assert after["history"][:2] == before["history"]
    assert after["wall_seconds"] > before["wall_seconds"]
    with pytest.raises(FileExistsError):
        fit(config(run, epochs=4))  # without --resume an existing run is never overwritten


def test_warm_start_begins_from_the_parent_weights_and_records_them(trained_run, tmp_path):
    parent = torch.load(trained_run / "best.pt", weights_only=False)
    fit(config(tmp_path, epochs=1, lr=0.0, init_from=str(trained_run / "best.pt")))
    child = torch.load(tmp_path / "last.pt", weights_only=False)
    # lr 0 and no augmentation: one epoch leaves the weights as loaded (BN stats move).
    for name, tensor in parent["model"].items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(child["model"][name], tensor), name
    assert child["warm_start"]["epochs"] == parent["epoch"]
    assert child["warm_start"]["wall_seconds"] == round(parent["wall_seconds"], 1)
    with pytest.raises(ValueError, match="not this run's"):
        fit(config(tmp_path / "other", model="cnn10", model_options={},
                   init_from=str(trained_run / "best.pt")))
    with pytest.raises(ValueError, match="not a training checkpoint"):
        fit(config(tmp_path / "text", init_from=str(trained_run / "log.txt")))


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        fit(config(tmp_path / "empty"), resume=True)


def test_two_process_ddp_run_on_cpu(tmp_path):
    run_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "train", "fit", "--model", "resnet", "--opt", "width=4", "--opt", "blocks=[1,1,1,1]",
        "--data", str(FER_MINI), "--run-dir", str(run_dir), "--epochs", "1", "--batch-size", "8",
        "--threads", "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(run_dir / "last.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and checkpoint["epoch"] == 1
    assert "2 process(es)" in (run_dir / "log.txt").read_text()


def export_args(checkpoint: Path, store: Path, **overrides) -> Namespace:
    values = dict(checkpoint=str(checkpoint), name=None, store=str(store), tta="", padding=None,
                  equalize=False, photos=None, note="")
    values.update(overrides)
    return Namespace(**values)


def test_export_writes_a_checked_onnx_model_its_card_and_plots(trained_run, tmp_path):
    from train.export import main as export

    export(export_args(trained_run / "best.pt", tmp_path, tta="hflip", padding=0.1,
                       photos=str(FACES)))
    folder = tmp_path / "resnet" / "1"
    assert {p.name for p in folder.iterdir()} == {"model.onnx", "model.json", "curves.png",
                                                  "confusion.png"}
    graph = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(graph)
    assert graph.opset_import[0].version >= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis

    card = ModelCard.read(folder / "model.json")
    assert card.classes == list(CLASSES) and card.tta == ["hflip"] and card.face_crop.padding == 0.1
    validation = card.metrics["validation"]
    assert 0 <= validation["accuracy"] <= 1 and validation["count"] == 42
    assert set(validation["per_class_accuracy"]) == set(CLASSES)
    assert np.asarray(validation["confusion"]).sum() == 42
    assert "accuracy_without_tta" in validation
    assert card.metrics["natural_photos"]["photos"] == 6
    training = card.training
    for key in ("data", "recipe", "epochs_run", "best_epoch", "device", "wall_seconds",
                "seconds_per_epoch", "commits", "export_commit", "parameters",
                "onnx_parity_max_abs_diff", "history"):
        assert key in training, key
    assert training["onnx_parity_max_abs_diff"] <= 1e-4
    assert training["data"]["fingerprints"]["validation"] == load_split(
        FER_MINI, "validation", cache_dir=None).fingerprint()

    export(export_args(trained_run / "best.pt", tmp_path))
    assert (tmp_path / "resnet" / "2" / "model.json").exists()  # the next version


def test_onnx_runtime_matches_pytorch_on_real_faces(trained_run, tmp_path):
    from service.card import InputSpec
    from train.export import check_parity, export_onnx, load_checkpoint

    model, checkpoint = load_checkpoint(trained_run / "best.pt")
    path = tmp_path / "m.onnx"
    export_onnx(model, 48, path)
    faces = load_split(FER_MINI, "validation", cache_dir=None).images
    assert check_parity(model, path, faces, InputSpec(**checkpoint["input_spec"])) <= 1e-4


def test_evaluate_cli_on_a_split_and_on_photos(trained_run, tmp_path):
    from train.export import main as export

    export(export_args(trained_run / "best.pt", tmp_path / "store"))
    out = tmp_path / "eval"
    done = subprocess.run(
        [sys.executable, "-m", "train", "evaluate", "--model", str(tmp_path / "store/resnet/1"),
         "--data", str(FER_MINI), "--split", "validation", "--photos", str(FACES),
         "--mirror", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validation"]["count"] == 42
    mirror = metrics["validation"]["mirror"]
    assert mirror["count"] == 42 and mirror["clean"]["count"] <= 42
    photos = metrics["natural_photos"]
    assert photos["photos"] == 6 and photos["detected"] >= 4
    assert (out / "confusion_validation.png").stat().st_size > 1000


def test_feature_maps_png_shows_every_conv_layer(tmp_path):
    run = tmp_path / "cnn"
    fit(config(run, model="cnn10", model_options={}, epochs=1, batch_size=32))
    out = tmp_path / "maps.png"
    done = subprocess.run(
        [sys.executable, "-m", "train", "feature-maps", "--model", str(run / "best.pt"),
         "--image", str(FACES / "happy" / "Marilyn_Monroe_0002.jpg"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 conv layers" in done.stdout and out.stat().st_size > 10_000


@pytest.mark.parametrize("args,message", [
    (["fit", "--data", "/nonexistent", "--run-dir", "RUN"], "FER2013 not found"),
    (["fit", "--model", "vgg", "--data", str(FER_MINI), "--run-dir", "RUN"], "unknown model"),
    (["fit", "--resume", "--data", str(FER_MINI), "--run-dir", "RUN"], "nothing to resume"),
    (["fit", "--resume", "/nonexistent.pt", "--data", str(FER_MINI), "--run-dir", "RUN"],
     "nothing to resume: /nonexistent.pt"),
    (["snapshot", "--run-dir", "RUN", "--out", "RUN.pt"], "nothing to snapshot"),
    (["fit", "--resume", "", "--data", str(FER_MINI), "--run-dir", "RUN"], "empty path"),
    (["fit", "--resume", str(FER_MINI / "README.md"), "--data", str(FER_MINI),
      "--run-dir", "RUN"], "not a training checkpoint"),
    (["export", "--checkpoint", str(FER_MINI / "README.md"), "--data", str(FER_MINI),
      "--store", "RUN"], "not a training checkpoint"),
    (["soup", "--checkpoint", str(FER_MINI / "README.md"), "--checkpoint",
      str(FER_MINI / "README.md"), "--data", str(FER_MINI), "--out", "RUN"],
     "not a training checkpoint"),
    (["evaluate", "--model", "/nonexistent", "--data", str(FER_MINI)], "has no model.json"),
    (["fit", "--mix", "blend", "--data", str(FER_MINI), "--run-dir", "RUN"], "is not one of"),
    (["compare", "--run", "RUN", "--data", str(FER_MINI)], "no best.pt"),
    (["fit", "--aug", "blur_p=2", "--data", str(FER_MINI), "--run-dir", "RUN"], "blur_p=2"),
    (["fit", "--aug", "blur_sigma=1", "--data", str(FER_MINI), "--run-dir", "RUN"], "pair"),
    (["fit", "--aug", "blurp=0.5", "--data", str(FER_MINI), "--run-dir", "RUN"],
     "unknown augmentation option(s) blurp"),
])
def test_cli_reports_bad_input_in_one_line(tmp_path, args, message):
    args = [str(tmp_path / "run") if a == "RUN" else a for a in args]
    done = subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_fit_runs_without_the_web_stack(tmp_path):
    """A GPU machine (train/device/oneshot.sh) has PyTorch but not FastAPI or Prometheus's
    client: `python -m train fit` must not import them."""
    import subprocess
    import sys

    from tests.conftest import FER_MINI, ROOT

    blocked = "fastapi starlette prometheus_client uvicorn pydantic_settings".split()
    script = (f"import runpy, sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
              "sys.argv = ['train'] + sys.argv[1:]\nrunpy.run_module('train', run_name='__main__')")
    result = subprocess.run(
        [sys.executable, "-c", script, "fit", "--model", "resnet", "--opt", "width=4",
         "--data", str(FER_MINI), "--run-dir", str(tmp_path / "run"), "--epochs", "1",
         "--max-batches-per-epoch", "1", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "best.pt").exists()


def test_a_snapshot_is_compact_and_a_new_machine_resumes_from_it(trained_run, tmp_path):
    from train.fit import Trainer
    from train.snapshot import write_snapshot

    snapshot = write_snapshot(trained_run, tmp_path / "committed" / "run.pt")
    last = torch.load(trained_run / "last.pt", weights_only=False)
    saved = torch.load(snapshot, weights_only=False)
    assert saved["optimizer"] is None and saved["snapshot"]["epoch"] == 2
    assert all(t.dtype == torch.float16 for t in saved["model"].values() if t.is_floating_point())
    assert snapshot.stat().st_size < 0.5 * (trained_run / "last.pt").stat().st_size

    # Loading widens the float16 weights back: the network starts where the run stopped,
    # within float16's rounding.
    trainer = Trainer(config(tmp_path / "probe", epochs=3), tmp_path / "probe")
    trainer.load(saved)
    for name, tensor in trainer.model.state_dict().items():
        expected = last["model"][name]
        assert tensor.dtype == expected.dtype, name
        if tensor.is_floating_point():
            assert torch.allclose(tensor, expected, rtol=1e-3, atol=1e-4), name

    run = tmp_path / "new-machine"  # no last.pt, no best.pt: only what a commit carried
    result = fit(config(run, epochs=3), resume=str(snapshot))
    after = torch.load(run / "last.pt", weights_only=False)
    assert result["epochs"] == 3 and after["epoch"] == 3
    assert after["history"][:2] == last["history"]
    assert after["wall_seconds"] > last["wall_seconds"]
    assert after["resumed_from_snapshots"] == [
        {"epoch": 2, "weights": "float16", "optimizer": "dropped: momentum restarts on resume"}]
    assert after["optimizer"]["state"], "the resumed run builds its momentum again"
    with pytest.raises(FileExistsError, match="already has a run"):
        fit(config(run, epochs=4), resume=str(snapshot))  # never over a run in progress


def test_snapshot_refuses_what_it_cannot_carry(tmp_path):
    from train.snapshot import write_snapshot

    with pytest.raises(FileNotFoundError, match="nothing to snapshot"):
        write_snapshot(tmp_path / "empty", tmp_path / "out.pt")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        write_snapshot(tmp_path / "text", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_a_resumed_run_keeps_its_own_settings_unless_the_command_line_names_them(tmp_path):
    from train.__main__ import options_given

    assert options_given(["fit", "--resume", "--run-dir", "r", "--epochs", "3"]) == {
        "resume", "run_dir", "epochs"}
    run = tmp_path / "run"
    fit(config(run, epochs=2, early_stop_patience=50, time_budget="30m"))
    done = subprocess.run(
        [sys.executable, "-m", "train", "fit", "--resume", "--run-dir", str(run), "--data",
         str(FER_MINI), "--epochs", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    after = torch.load(run / "last.pt", weights_only=False)
    assert after["epoch"] == 3 and after["config"]["epochs"] == 3  # named: changed
    # not named: the run's own, not the command line's defaults (15, no budget, all cores)
    assert after["config"]["early_stop_patience"] == 50
    assert after["config"]["time_budget"] == "30m" and after["config"]["threads"] == 1
