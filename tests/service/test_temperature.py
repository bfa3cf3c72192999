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
