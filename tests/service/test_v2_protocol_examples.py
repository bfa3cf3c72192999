"""The protocol's own examples, by hand over raw HTTP (httpx), against a real server.

The KServe v2 REST specification shows an inference request and its response in JSON, an
error as `{"error": ...}`, and the binary tensor extension's layout; these are those
exchanges with this service's tensors, each byte written here rather than by a client
library.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.card import CLASSES
from tests.conftest import live_server
from tests.service.v2_helpers import crops_for, fer_faces, predicted_probabilities


@pytest.fixture(scope="module")
def server(model_store: Path) -> Iterator[str]:
    with live_server(model_store) as url:
        yield url


def test_the_specifications_json_exchange(server: str) -> None:
    metadata = httpx.get(f"{server}/v2/models/cnn10").json()
    faces = fer_faces(2)
    crops = crops_for(faces, metadata["parameters"]["input_mean"],
                      metadata["parameters"]["input_std"])
    request = {
        "id": "42",
        "inputs": [{"name": "input", "shape": [2, 1, 48, 48], "datatype": "FP32",
                    "data": crops.tolist()}],  # nested, as the specification allows
        "outputs": [{"name": "probabilities"}],
    }
    response = httpx.post(f"{server}/v2/models/cnn10/infer", content=json.dumps(request),
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"model_name", "model_version", "id", "outputs"}
    assert (body["model_name"], body["model_version"], body["id"]) == ("cnn10", "1", "42")
    (output,) = body["outputs"]
    assert set(output) == {"name", "shape", "datatype", "data"}
    assert output["name"] == "probabilities"
    assert (output["shape"], output["datatype"]) == ([2, 7], "FP32")
    assert len(output["data"]) == 14 and all(isinstance(v, float) for v in output["data"])
    expected = np.concatenate([predicted_probabilities(httpx.post(
        f"{server}/predict?model=cnn10&detect=false", content=path.read_bytes()).json())
        for path in faces])
    np.testing.assert_allclose(np.reshape(output["data"], (2, 7)), expected, atol=2e-6)


def test_the_specifications_error_form(server: str) -> None:
    request = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "UINT32",
                           "data": [1, 2, 3]}]}
    response = httpx.post(f"{server}/v2/models/cnn10/infer", json=request)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "input 'input' must be FP32, not UINT32"}


def test_the_binary_tensor_extensions_layout(server: str) -> None:
    crops = np.zeros((1, 1, 48, 48), np.float32)
    header = json.dumps({
        "inputs": [{"name": "input", "shape": [1, 1, 48, 48], "datatype": "FP32",
                    "parameters": {"binary_data_size": 9216}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                    {"name": "labels", "parameters": {"binary_data": True}}],
    }).encode()
    response = httpx.post(f"{server}/v2/models/cnn10/infer",
                          content=header + crops.astype("<f4").tobytes(),
                          headers={"Inference-Header-Content-Length": str(len(header)),
                                   "Content-Type": "application/octet-stream"})
    assert response.status_code == 200
    length = int(response.headers["Inference-Header-Content-Length"])
    document = json.loads(response.content[:length])
    probabilities, labels = document["outputs"]
    assert probabilities == {"name": "probabilities", "datatype": "FP32", "shape": [1, 7],
                             "parameters": {"binary_data_size": 28}}
    rest = response.content[length:]
    values = struct.unpack("<7f", rest[:28])
    assert sum(values) == pytest.approx(1.0, abs=1e-5)
    names, offset = [], 28
    while offset < len(rest):  # BYTES: a 4-byte little-endian length before each element
        (size,) = struct.unpack_from("<I", rest, offset)
        names.append(rest[offset + 4 : offset + 4 + size].decode())
        offset += 4 + size
    assert names == list(CLASSES)
    assert labels["parameters"]["binary_data_size"] == len(rest) - 28
