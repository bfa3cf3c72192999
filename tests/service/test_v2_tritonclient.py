"""/v2 driven by NVIDIA's own client, `tritonclient[http]`, as its documentation shows.

A real uvicorn server; the client sends binary tensors by default and JSON tensors with
`binary_data=False`. What it reads back must equal /predict's answer for the same faces.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from service.card import CLASSES
from tests.conftest import live_server
from tests.service.v2_helpers import (
    blank_png,
    crops_for,
    fer_faces,
    photos,
    predicted_boxes,
    predicted_probabilities,
)

KEY = "triton-client-key"


def auth() -> dict[str, str]:
    # A new dict each call: the client adds its own headers to the one it is given.
    return {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(model_store: Path) -> Iterator[str]:
    with live_server(model_store, api_keys=KEY) as url:
        yield url


@pytest.fixture
def client(server: str) -> Iterator[httpclient.InferenceServerClient]:
    triton = httpclient.InferenceServerClient(url=server.removeprefix("http://"))
    yield triton
    triton.close()


def predict(server: str, image: bytes, query: str) -> dict:
    response = httpx.post(f"{server}/predict?{query}", content=image, headers=auth(), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "classification"]
    for model in ("cnn10", "resnet", "ensemble"):
        assert client.is_model_ready(model)
        metadata = client.get_model_metadata(model)
        assert metadata["name"] == model
        assert {t["name"] for t in metadata["inputs"]} == {"input", "image"}
    assert client.is_model_ready("cnn10", model_version="1")
    assert not client.is_model_ready("vgg")
    assert not client.is_model_ready("cnn10", model_version="7")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", ["cnn10", "ensemble"])
def test_a_crop_batch_gets_predicts_probabilities(
    server: str, client: httpclient.InferenceServerClient, model: str, binary: bool
) -> None:
    metadata = client.get_model_metadata(model)
    faces = fer_faces(6)
    crops = crops_for(faces, metadata["parameters"]["input_mean"],
                      metadata["parameters"]["input_std"])
    batch = httpclient.InferInput("input", list(crops.shape), "FP32")
    batch.set_data_from_numpy(crops, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary),
               httpclient.InferRequestedOutput("labels", binary_data=binary)]
    result = client.infer(model, [batch], outputs=outputs, headers=auth(), request_id="crops")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (6, 7) and probabilities.dtype == np.float32
    labels = [label.decode() if isinstance(label, bytes) else label
              for label in result.as_numpy("labels")]
    assert labels == list(CLASSES)
    assert result.get_response()["id"] == "crops"
    expected = np.concatenate([predicted_probabilities(
        predict(server, path.read_bytes(), f"model={model}&detect=false")) for path in faces])
    np.testing.assert_allclose(probabilities, expected, atol=2e-6)


def test_the_default_request_is_all_binary(client: httpclient.InferenceServerClient) -> None:
    """No outputs named: the client asks for every output as binary data."""
    metadata = client.get_model_metadata("resnet")
    crops = crops_for(fer_faces(2), metadata["parameters"]["input_mean"],
                      metadata["parameters"]["input_std"])
    batch = httpclient.InferInput("input", list(crops.shape), "FP32")
    batch.set_data_from_numpy(crops)
    result = client.infer("resnet", [batch], model_version="1", headers=auth())
    described = {o["name"]: o for o in result.get_response()["outputs"]}
    assert set(described) == {"probabilities", "labels"}
    assert all("binary_data_size" in o["parameters"] and "data" not in o
               for o in described.values())
    assert result.as_numpy("probabilities").sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_photos_get_predicts_faces(server: str, client: httpclient.InferenceServerClient,
                                   binary: bool) -> None:
    images = [*photos(2), blank_png(), photos(3)[2]]
    # JSON carries strings: each photo as base64, as the model's metadata says.
    elements = images if binary else [base64.b64encode(image) for image in images]
    batch = httpclient.InferInput("image", [len(images)], "BYTES")
    batch.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary)
               for name in ("boxes", "probabilities", "image_index")]
    result = client.infer("ensemble", [batch], outputs=outputs, headers=auth())
    answers = [predict(server, image, "model=ensemble") for image in images]
    assert result.as_numpy("image_index").tolist() == [
        i for i, answer in enumerate(answers) for _ in answer["faces"]]
    np.testing.assert_array_equal(result.as_numpy("boxes"),
                                  np.concatenate([predicted_boxes(a) for a in answers]))
    np.testing.assert_allclose(result.as_numpy("probabilities"),
                               np.concatenate([predicted_probabilities(a) for a in answers]),
                               atol=1e-6)


def test_the_classification_extension(client: httpclient.InferenceServerClient) -> None:
    batch = httpclient.InferInput("image", [1], "BYTES")
    batch.set_data_from_numpy(np.array(photos(1), dtype=np.object_))
    top = httpclient.InferRequestedOutput("probabilities", class_count=2)
    result = client.infer("cnn10", [batch], outputs=[top], headers=auth())
    plain = client.infer("cnn10", [batch], headers=auth()).as_numpy("probabilities")[0]
    (row,) = result.as_numpy("probabilities")
    best = np.argsort(-plain, kind="stable")[:2]
    assert [entry.decode().split(":", 1)[1] for entry in row] == [
        f"{i}:{CLASSES[i]}" for i in best]


def test_errors_reach_the_client_with_their_status(
    client: httpclient.InferenceServerClient,
) -> None:
    wrong = httpclient.InferInput("input", [1, 1, 32, 32], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 1, 32, 32), np.float32))
    cases = [("cnn10", {}, [wrong], "401", "API key"),
             ("cnn10", auth(), [wrong], "400", "[-1, 1, 48, 48]"),
             ("vgg", auth(), [wrong], "404", "unknown model 'vgg'")]
    for model, headers, inputs, status, message in cases:
        with pytest.raises(InferenceServerException) as refused:
            client.infer(model, inputs, headers=headers)
        assert refused.value.status() == status and message in refused.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("vgg")
    assert unknown.value.status() == "404"
