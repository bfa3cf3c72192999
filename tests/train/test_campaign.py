"""The training campaign's machinery: warm starts from the committed ONNX form, a wall-time
budget, selection on clean validation faces, calibration, refusals and atomic export."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from service.card import ModelCard
from service.model_store import is_version_folder
from service.onnx_model import OnnxModel
from service.preprocess import normalize
from tests.conftest import COMMITTED_STORE, FER_MINI
from tests.train.test_fit_export import config, export_args
from train import models
from train.calibrate import expected_calibration_error, fit_temperature, probabilities_at
from train.checkpoint import read_checkpoint
from train.data import Split, load_split, seen_in
from train.fit import fit, parse_duration
from train.onnx_weights import load_onnx_weights


def latest_committed(name: str) -> Path:
    versions = [p for p in (COMMITTED_STORE / name).iterdir() if is_version_folder(p)]
    return max(versions, key=lambda p: int(p.name))


@pytest.mark.parametrize("name", ["cnn10", "resnet"])
def test_a_committed_version_rebuilds_into_the_network_it_was_exported_from(name):
    folder = latest_committed(name)
    card = ModelCard.read(folder / "model.json")
    network = models.build(name, **card.training["recipe"]["model_options"])
    faces = normalize(load_split(FER_MINI, "train", cache_dir=None).images, card.input)
    difference = load_onnx_weights(network, folder / "model.onnx", faces)
    assert difference < 1e-3
    # The rebuilt network answers as the served ONNX model does, face by face.
    served = OnnxModel(folder, ["CPUExecutionProvider"], threads=1)
    with torch.no_grad():
        rebuilt = network.eval()(torch.from_numpy(faces)).numpy()
    (onnx_logits,) = served.session.run(None, {served.input_name: faces})
    assert (rebuilt.argmax(1) == onnx_logits.argmax(1)).all()


def test_fit_continues_from_a_committed_version_with_its_epochs_carried(tmp_path):
    folder = latest_committed("cnn10")
    card = ModelCard.read(folder / "model.json")
    options = card.training["recipe"]["model_options"]
    run = tmp_path / "run"
    fit(config(run, model="cnn10", model_options=options, epochs=1, lr=0.0,
               max_batches_per_epoch=1, init_from=str(folder)))
    child = torch.load(run / "last.pt", weights_only=False)
    parent_epochs = (card.training["epochs_run"]
                     + (card.training.get("warm_start") or {}).get("epochs", 0))
    assert child["warm_start"]["epochs"] == parent_epochs > 0
    assert child["warm_start"]["checkpoint"] == str(folder)
    assert child["epoch"] == 1
    # lr 0: the weights trained on are the committed ones (batch norm statistics aside).
    network = models.build("cnn10", **options)
    faces = normalize(load_split(FER_MINI, "train", cache_dir=None).images, card.input)
    load_onnx_weights(network, folder / "model.onnx", faces)
    for key, tensor in network.state_dict().items():
        if "running" not in key and "num_batches" not in key and "bn" not in key:
            trained = child["model"][key]
            if trained.dtype.is_floating_point and key.endswith("weight") and tensor.ndim > 1:
                assert torch.allclose(trained, tensor, atol=1e-6), key
    with pytest.raises(ValueError, match="is not this run's"):
        fit(config(tmp_path / "other", init_from=str(folder)))


def test_onnx_weights_refuse_a_graph_of_another_network():
    folder = latest_committed("resnet")
    card = ModelCard.read(folder / "model.json")
    faces = normalize(load_split(FER_MINI, "train", cache_dir=None).images, card.input)
    with pytest.raises(ValueError):
        load_onnx_weights(models.build("cnn10"), folder / "model.onnx", faces)


def test_a_time_budget_stops_the_run_and_decays_the_rate_to_zero(tmp_path):
    result = fit(config(tmp_path, epochs=500, time_budget="3s", max_batches_per_epoch=2))
    history = json.loads((tmp_path / "history.json").read_text())
    assert result["epochs"] < 500 and result["epochs"] == len(history)
    assert history[-1]["lr"] < history[0]["lr"]


def test_kept_epochs_are_the_newest_weights_and_a_resume_may_keep_more(tmp_path):
    fit(config(tmp_path, epochs=3, keep_epochs=2, max_batches_per_epoch=2))
    assert sorted(p.name for p in tmp_path.glob("epoch-*.pt")) == ["epoch-0002.pt",
                                                                   "epoch-0003.pt"]
    last = read_checkpoint(tmp_path / "last.pt", "last")
    third = read_checkpoint(tmp_path / "epoch-0003.pt", "epoch 3")
    assert third["epoch"] == 3 and third["optimizer"] is None
    assert all(torch.equal(last["model"][k], third["model"][k]) for k in last["model"])
    second = read_checkpoint(tmp_path / "epoch-0002.pt", "epoch 2")
    assert not all(torch.equal(second["model"][k], third["model"][k]) for k in last["model"])
    (tmp_path / "epoch-notes.pt").write_text("a user's file, not an epoch")
    fit(config(tmp_path, epochs=5, keep_epochs=3), resume=True, given={"epochs", "keep_epochs"})
    assert sorted(p.name for p in tmp_path.glob("epoch-*.pt")) == [
        "epoch-0003.pt", "epoch-0004.pt", "epoch-0005.pt", "epoch-notes.pt"]
    with pytest.raises(ValueError, match="keep-epochs"):
        fit(config(tmp_path / "other", keep_epochs=-1))


def test_durations_parse_and_bad_ones_are_refused():
    assert parse_duration("150m") == 9000 and parse_duration("2h") == 7200
    assert parse_duration("90s") == 90 and parse_duration("45") == 45 and parse_duration("") == 0
    for bad in ("soon", "-5m", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_validation_faces_seen_in_training_are_found_and_left_out_of_selection(tmp_path):
    train = load_split(FER_MINI, "train", cache_dir=None)
    val = load_split(FER_MINI, "validation", cache_dir=None)
    assert not seen_in(val, train).any()  # the fixture's splits are disjoint
    doubled = Split(np.concatenate([val.images, train.images[:5]]),
                    np.concatenate([val.labels, train.labels[:5]]))
    mask = seen_in(doubled, train)
    assert mask.sum() == 5 and mask[-5:].all()
    fit(config(tmp_path, epochs=1))
    record = json.loads((tmp_path / "history.json").read_text())[0]
    assert record["val_clean_accuracy"] == record["val_accuracy"]  # nothing to leave out here


def test_resume_on_other_data_is_refused(tmp_path):
    run = tmp_path / "run"
    fit(config(run, epochs=1))
    other = tmp_path / "other-data"
    shutil.copytree(FER_MINI, other)
    victim = next((other / "train" / "happy").iterdir())
    victim.unlink()
    with pytest.raises(ValueError, match="other data"):
        fit(config(run, epochs=2, data=str(other)), resume=True)


def test_a_model_option_that_contradicts_the_model_name_is_refused():
    with pytest.raises(ValueError, match="fixes"):
        models.build("resnet", improved=False)
    assert models.build("resnet", improved=True) is not None


def test_ece_of_a_known_case():
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bin 0.9: accuracy 0.5 vs 0.9; bin 0.6: accuracy 1.0 vs 0.6 -> 0.5 * 0.4 + 0.5 * 0.4
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.4)


def test_temperature_scaling_fixes_overconfident_logits_without_moving_the_argmax():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, (4000, 7)).astype(np.float32)
    exp = np.exp(true_logits - true_logits.max(1, keepdims=True))
    labels = np.array([rng.choice(7, p=row / row.sum()) for row in exp])
    logits = 3.0 * true_logits  # three times too confident
    temperature = fit_temperature(logits, 1, labels)
    assert 2.6 < temperature < 3.4
    before = expected_calibration_error(probabilities_at(logits, 1, 1.0), labels)
    after = expected_calibration_error(probabilities_at(logits, 1, temperature), labels)
    assert after < 0.03 < before
    assert (probabilities_at(logits, 1, temperature).argmax(1) == logits.argmax(1)).all()


def test_export_stages_out_of_sight_then_publishes_a_finished_version(tmp_path, monkeypatch):
    import train.export as export

    run = tmp_path / "run"
    fit(config(run, epochs=1))
    store = tmp_path / "store"
    seen_while_measuring = {}
    measure = export.measure_staged

    def spying_measure(staging, name, version, *rest):
        seen_while_measuring["numbered"] = (store / name / str(version)).exists()
        seen_while_measuring["staging_hidden"] = staging.parent.parent.name.startswith(".")
        return measure(staging, name, version, *rest)

    monkeypatch.setattr(export, "measure_staged", spying_measure)
    export.main(export_args(run / "best.pt", store))
    assert seen_while_measuring == {"numbered": False, "staging_hidden": True}
    card = ModelCard.read(store / "resnet" / "1" / "model.json")
    calibration = card.metrics["validation"]["calibration"]
    assert card.temperature == calibration["temperature"] > 0
    assert {"ece_before", "ece_after"} <= set(calibration)
    assert card.metrics["validation"]["clean"]["count"] == card.metrics["validation"]["count"]
    assert [p.name for p in store.iterdir()] == ["resnet"]
    assert [p.name for p in (store / "resnet").iterdir()] == ["1"]

    def failing_measure(*_):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(export, "measure_staged", failing_measure)
    with pytest.raises(RuntimeError):
        export.main(export_args(run / "best.pt", store))
    assert [p.name for p in store.iterdir()] == ["resnet"]  # nothing half-made left
    assert [p.name for p in (store / "resnet").iterdir()] == ["1"]


def test_training_equalises_faces_when_asked(tmp_path, monkeypatch):
    import train.fit as fit_module

    seen = []
    real = fit_module.equalize_randomly

    def recording(faces, p, generator):
        out = real(faces, p, generator)
        seen.append((p, bool((out != faces).any())))
        return out

    monkeypatch.setattr(fit_module, "equalize_randomly", recording)
    fit(config(tmp_path, epochs=1, max_batches_per_epoch=2,
               augment={**config(tmp_path).augment, "equalize_p": 1.0}))
    assert seen and all(p == 1.0 and changed for p, changed in seen)
