"""The models committed in model_store/: honest cards, loadable graphs, sensible answers."""

from pathlib import Path

import pytest

from service.card import CARD_FILENAME, ModelCard
from service.model_store import ModelStore, is_version_folder
from service.onnx_model import OnnxModel
from tests.conftest import COMMITTED_STORE, photo, running_app

VERSIONS = sorted(
    version
    for model in (COMMITTED_STORE.iterdir() if COMMITTED_STORE.is_dir() else [])
    if model.is_dir()
    for version in model.iterdir()
    if is_version_folder(version)
)


def test_both_papers_networks_are_committed():
    names = {version.parent.name for version in VERSIONS}
    assert {"cnn10", "resnet"} <= names


@pytest.mark.parametrize("folder", VERSIONS, ids=[f"{v.parent.name}/{v.name}" for v in VERSIONS])
def test_every_version_has_an_honest_card_that_matches_its_graph(folder: Path):
    card = ModelCard.read(folder / CARD_FILENAME)
    OnnxModel(folder, ["CPUExecutionProvider"], threads=1)  # checks the graph against the card
    validation = card.metrics["validation"]
    assert 0.25 < validation["accuracy"] <= 1.0 and validation["count"] == 3589
    assert set(validation["per_class_accuracy"]) == set(card.classes)
    training = card.training
    for fact in ("data", "recipe", "epochs_run", "device", "wall_seconds", "commits", "parameters"):
        assert training.get(fact) not in (None, "", "unknown"), fact
    assert training["data"]["fingerprints"]["train"]
    assert (folder / "model.onnx").stat().st_size < 40 * 1024 * 1024
    assert (folder / "curves.png").exists() and (folder / "confusion.png").exists()


def test_at_most_two_versions_of_a_model_are_kept():
    for model in {v.parent for v in VERSIONS}:
        assert len([v for v in VERSIONS if v.parent == model]) <= 2, model.name


def test_the_service_serves_every_committed_version():
    store = ModelStore(COMMITTED_STORE)
    result = store.sync()
    assert result.failed == [] and store.loaded_count() == len(VERSIONS)


def test_the_trained_ensemble_reads_a_smile_as_happy():
    with running_app(COMMITTED_STORE) as client:
        body = client.post("/predict", content=photo("happy/Marilyn_Monroe_0002.jpg")).json()
        assert body["model"] == "ensemble"
        (face,) = body["faces"]
        assert face["label"] == "happy", face["probabilities"]
