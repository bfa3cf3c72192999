"""The service applies a card's temperature: probabilities change, the argmax does not."""

from pathlib import Path

import numpy as np

from service.onnx_model import OnnxModel
from service.preprocess import normalize
from tests.conftest import FER_MINI
from train.data import load_split


def test_the_cards_temperature_softens_probabilities_but_keeps_the_answer(model_store: Path):
    model = OnnxModel(model_store / "cnn10" / "1", ["CPUExecutionProvider"], threads=1)
    faces = normalize(load_split(FER_MINI, "validation", cache_dir=None).images, model.card.input)
    plain = model.infer(faces)
    model.card = model.card.model_copy(update={"temperature": 2.5})
    softened = model.infer(faces)
    assert np.allclose(softened.sum(1), 1.0, atol=1e-5)
    assert (softened.argmax(1) == plain.argmax(1)).all()
    assert (softened.max(1) < plain.max(1) + 1e-7).all()
    assert not np.allclose(softened, plain)


def test_the_ensemble_temperature_applies_only_to_the_members_it_was_fitted_for(
        model_store: Path, tmp_path: Path):
    import json
    import shutil

    from service.model_store import ModelStore
    from service.pipeline import combine_members

    store_dir = tmp_path / "store"
    shutil.copytree(model_store, store_dir)
    members = ["cnn10", "resnet"]
    store = ModelStore(store_dir, ensemble_members=members)
    store.sync()
    served = store.resolve("ensemble")
    assert served.temperature == 1.0  # nothing fitted yet
    pinned = sorted(f"{m.name}:{m.version}" for m in served.members)
    (store_dir / "ensemble.json").write_text(json.dumps({"members": pinned, "temperature": 0.5}))
    store.sync()  # the store reads the calibration when it re-scans
    assert store.resolve("ensemble").temperature == 0.5
    (store_dir / "ensemble.json").write_text(json.dumps({"members": ["cnn10:9", "resnet:9"],
                                                        "temperature": 0.5}))
    store.sync()
    assert store.resolve("ensemble").temperature == 1.0  # fitted for other versions
    (store_dir / "ensemble.json").write_text("not json")
    store.sync()
    assert store.resolve("ensemble").temperature == 1.0

    rng = np.random.default_rng(0)
    a, b = rng.dirichlet(np.ones(7), 50), rng.dirichlet(np.ones(7), 50)
    sharpened = combine_members([a, b], 0.5)
    assert np.allclose(sharpened.sum(1), 1.0, atol=1e-5)
    assert (sharpened.argmax(1) == ((a + b) / 2).argmax(1)).all()
    assert (sharpened.max(1) >= ((a + b) / 2).max(1) - 1e-7).all()
    assert np.array_equal(combine_members([a, b]), (a + b) / 2)
