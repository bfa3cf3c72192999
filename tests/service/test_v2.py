"""/v2, the Open Inference Protocol: metadata, both inputs, both encodings, every error."""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import metrics
from service.app import create_app
from service.card import CLASSES
from service.settings import Settings
from tests.conftest import photo, running_app, wait_until
from tests.service.test_imaging import png_header_claiming
from tests.service.v2_helpers import (
    binary_request,
    blank_png,
    crops_for,
    fer_faces,
    length_prefixed,
    photos,
    predicted_boxes,
    predicted_probabilities,
    split_binary_response,
)


@pytest.fixture(scope="module")
def client(model_store: Path) -> Iterator[TestClient]:
    with running_app(model_store) as c:
        yield c


def crop_input(crops: np.ndarray) -> dict:
    return {"name": "input", "shape": list(crops.shape), "datatype": "FP32",
            "data": crops.ravel().tolist()}


def image_input(images: list[bytes]) -> dict:
    return {"name": "image", "shape": [len(images)], "datatype": "BYTES",
            "data": [base64.b64encode(image).decode() for image in images]}


def output(body: dict, name: str) -> np.ndarray:
    (found,) = [o for o in body["outputs"] if o["name"] == name]
    dtype = {"FP32": np.float32, "INT32": np.int32, "BYTES": object}[found["datatype"]]
    return np.array(found["data"], dtype=dtype).reshape(found["shape"])


def normalisation(client: TestClient, model: str) -> tuple[float, float]:
    parameters = client.get(f"/v2/models/{model}").json()["parameters"]
    return parameters["input_mean"], parameters["input_std"]


# -- health and metadata -------------------------------------------------------------------
def test_server_metadata_liveness_and_readiness(client: TestClient) -> None:
    assert client.get("/v2").json() == {"name": "fer-service", "version": "0.1.0",
                                        "extensions": ["binary_tensor_data", "classification"]}
    for path in ("/v2/health/live", "/v2/health/ready"):
        response = client.get(path)
        assert response.status_code == 200 and response.content == b""


def test_readiness_is_503_while_no_model_is_loaded(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(model_store=tmp_path, reload_interval_s=0))) as c:
        assert wait_until(lambda: c.app.state.runtime.ready)
        response = c.get("/v2/health/ready")
        assert response.status_code == 503 and response.json()["error"]
        assert c.get("/v2/health/live").status_code == 200
        for model in ("cnn10", "vgg"):  # configured (an ensemble member) or not
            not_ready = c.get(f"/v2/models/{model}/ready")
            predicted = c.post(f"/predict?model={model}", content=photo())
            assert not_ready.status_code == predicted.status_code >= 400  # as /predict says
            assert not_ready.json()["error"] == predicted.json()["detail"]


def test_model_metadata_comes_from_the_card(client: TestClient) -> None:
    for path in ("/v2/models/cnn10", "/v2/models/cnn10/versions/1"):
        body = client.get(path).json()
        assert body["name"] == "cnn10" and body["versions"] == ["1"]
        assert body["platform"] == "onnxruntime_onnx"
        assert [(t["name"], t["datatype"], t["shape"]) for t in body["inputs"]] == [
            ("input", "FP32", [-1, 1, 48, 48]), ("image", "BYTES", [-1])]
        assert [(t["name"], t["datatype"], t["shape"]) for t in body["outputs"]] == [
            ("probabilities", "FP32", [-1, 7]), ("labels", "BYTES", [7]),
            ("boxes", "INT32", [-1, 4]), ("image_index", "INT32", [-1])]
        assert all(t["parameters"]["description"] for t in body["inputs"] + body["outputs"])
        card = client.app.state.runtime.store.get("cnn10").card
        assert body["parameters"] == {"classes": ",".join(CLASSES), "input_size": 48,
                                      "input_mean": card.input.mean,
                                      "input_std": card.input.std}
    ensemble = client.get("/v2/models/ensemble").json()
    assert ensemble["platform"] == "ensemble" and ensemble["versions"] == ["1"]
    assert ensemble["parameters"]["members"] == "cnn10:1,resnet:1"


@pytest.mark.parametrize("path,status", [
    ("/v2/models/vgg", 404),
    ("/v2/models/cnn10/versions/7", 404),
    ("/v2/models/ensemble/versions/2", 404),
    ("/v2/models/cnn10/versions/abc", 400),
    ("/v2/models/cnn10/versions/0", 400),
    ("/v2/models/cnn10/versions/²", 400),  # str.isdigit is true, int() raises
    ("/v2/models/cnn10/versions/١", 400),  # Arabic-Indic one: int() would read 1
    ("/v2/models/vgg/ready", 404),
    ("/v2/models/cnn10/versions/7/ready", 404),
])
def test_unknown_models_and_versions_are_protocol_errors(client: TestClient, path: str,
                                                         status: int) -> None:
    response = client.get(path)
    assert response.status_code == status
    assert list(response.json()) == ["error"] and response.json()["error"]
    infer_path = path.removesuffix("/ready") + "/infer"
    infer = client.post(infer_path, json={"inputs": [image_input([photo()])]})
    assert infer.status_code == status and list(infer.json()) == ["error"]


def test_loaded_models_are_ready(client: TestClient) -> None:
    for path in ("/v2/models/cnn10/ready", "/v2/models/resnet/versions/1/ready",
                 "/v2/models/ensemble/ready"):
        response = client.get(path)
        assert response.status_code == 200 and response.content == b""


# -- inference: answers equal /predict's ---------------------------------------------------
@pytest.mark.parametrize("model", ["cnn10", "resnet", "ensemble"])
def test_crops_get_the_probabilities_predict_gives_the_same_faces(client: TestClient,
                                                                  model: str) -> None:
    faces = fer_faces(8)
    crops = crops_for(faces, *normalisation(client, model))
    response = client.post(f"/v2/models/{model}/infer",
                           json={"id": "batch-1", "inputs": [crop_input(crops)]})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (model, "1", "batch-1")
    probabilities = output(body, "probabilities")
    assert probabilities.shape == (8, 7) and probabilities.dtype == np.float32
    assert list(output(body, "labels")) == list(CLASSES)
    expected = np.concatenate([
        predicted_probabilities(client.post(f"/predict?model={model}&detect=false",
                                            content=path.read_bytes()).json())
        for path in faces])
    np.testing.assert_allclose(probabilities, expected, atol=2e-6)
    assert len({row.argmax() for row in probabilities}) >= 1
    assert not np.allclose(probabilities[0], probabilities[1:])  # different faces, different rows


def test_photos_go_through_the_whole_pipeline_as_predict(client: TestClient) -> None:
    images = [photos(1)[0], blank_png(), *photos(3)[1:]]  # a photo without a face among them
    response = client.post("/v2/models/ensemble/infer", json={"inputs": [image_input(images)]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [o["name"] for o in body["outputs"]] == ["boxes", "probabilities", "image_index",
                                                     "labels"]
    answers = [client.post("/predict?model=ensemble", content=image).json() for image in images]
    assert [len(a["faces"]) for a in answers][1] == 0
    expected_index = [i for i, answer in enumerate(answers) for _ in answer["faces"]]
    assert output(body, "image_index").tolist() == expected_index
    np.testing.assert_array_equal(output(body, "boxes"),
                                  np.concatenate([predicted_boxes(a) for a in answers]))
    np.testing.assert_allclose(output(body, "probabilities"),
                               np.concatenate([predicted_probabilities(a) for a in answers]),
                               atol=1e-6)


def test_an_ensemble_of_differently_normalised_members_reads_crops_as_the_first_does(
    tmp_path: Path, model_store: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    card_path = store / "resnet" / "1" / "model.json"
    card = json.loads(card_path.read_text())
    card["input"] |= {"mean": 0.3, "std": 0.4}
    card_path.write_text(json.dumps(card))
    faces = fer_faces(4)
    with running_app(store) as c:
        crops = crops_for(faces, *normalisation(c, "ensemble"))
        assert normalisation(c, "ensemble") == normalisation(c, "cnn10") != (0.3, 0.4)
        body = c.post("/v2/models/ensemble/infer", json={"inputs": [crop_input(crops)]}).json()
        expected = np.concatenate([
            predicted_probabilities(c.post("/predict?model=ensemble&detect=false",
                                           content=path.read_bytes()).json())
            for path in faces])
    np.testing.assert_allclose(output(body, "probabilities"), expected, atol=2e-6)


def test_binary_inputs_and_a_mix_of_binary_and_json_outputs(client: TestClient) -> None:
    crops = crops_for(fer_faces(3), *normalisation(client, "cnn10"))
    header = {"inputs": [{"name": "input", "shape": [3, 1, 48, 48], "datatype": "FP32",
                          "parameters": {"binary_data_size": crops.nbytes}}],
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                          {"name": "labels"}]}
    content, headers = binary_request(header, crops.astype("<f4").tobytes())
    response = client.post("/v2/models/cnn10/infer", content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    document, blobs = split_binary_response(
        response.content, int(response.headers["inference-header-content-length"]))
    binary = np.frombuffer(blobs["probabilities"], "<f4").reshape(3, 7)
    as_json = client.post("/v2/models/cnn10/infer", json={"inputs": [crop_input(crops)]}).json()
    np.testing.assert_allclose(binary, output(as_json, "probabilities"), atol=2e-6)
    assert output(document, "labels").tolist() == list(CLASSES)
    # binary_data_output makes every output binary; BYTES are length-prefixed elements
    header = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(photo()) + 4}}],
              "parameters": {"binary_data_output": True}}
    content, headers = binary_request(header, length_prefixed([photo()]))
    response = client.post("/v2/models/cnn10/infer", content=content, headers=headers)
    document, blobs = split_binary_response(
        response.content, int(response.headers["inference-header-content-length"]))
    assert blobs["labels"] == length_prefixed([name.encode() for name in CLASSES])
    faces = client.post("/predict?model=cnn10", content=photo()).json()
    assert np.frombuffer(blobs["boxes"], "<i4").reshape(-1, 4).tolist() == \
        predicted_boxes(faces).tolist()
    assert np.frombuffer(blobs["image_index"], "<i4").tolist() == [0]


def test_requested_outputs_and_the_classification_extension(client: TestClient) -> None:
    crops = crops_for(fer_faces(2), *normalisation(client, "resnet"))
    body = client.post("/v2/models/resnet/infer", json={
        "inputs": [crop_input(crops)],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
    }).json()
    (only,) = body["outputs"]
    assert (only["name"], only["datatype"], only["shape"]) == ("probabilities", "BYTES", [2, 3])
    plain = client.post("/v2/models/resnet/infer", json={"inputs": [crop_input(crops)]}).json()
    probabilities = output(plain, "probabilities")
    for row, entries in zip(probabilities, np.array(only["data"]).reshape(2, 3), strict=True):
        parsed = [entry.split(":") for entry in entries]
        indices = [int(index) for _, index, _ in parsed]
        assert indices == list(np.argsort(-row, kind="stable")[:3])
        assert [label for _, _, label in parsed] == [CLASSES[i] for i in indices]
        np.testing.assert_allclose([float(score) for score, _, _ in parsed], row[indices],
                                   atol=1e-6)


def test_an_empty_batch_gets_empty_outputs(client: TestClient) -> None:
    body = client.post("/v2/models/cnn10/infer", json={"inputs": [
        {"name": "input", "shape": [0, 1, 48, 48], "datatype": "FP32", "data": []}]}).json()
    assert output(body, "probabilities").shape == (0, 7)
    body = client.post("/v2/models/cnn10/infer", json={"inputs": [image_input([])]}).json()
    assert output(body, "boxes").shape == (0, 4) and output(body, "image_index").shape == (0,)


# -- errors --------------------------------------------------------------------------------
ZERO_CROP = [0.0] * 48 * 48


def crop(shape: list[int] | None = None, data: object = None, datatype: str = "FP32",
         name: str = "input") -> dict:
    return {"name": name, "shape": shape or [1, 1, 48, 48], "datatype": datatype,
            "data": ZERO_CROP if data is None else data}


BAD_JSON = [
    ("not json", b"{nope", 400, "not valid JSON"),
    ("no inputs", {"inputs": []}, 400, "at least 1"),
    ("shape of strings", {"inputs": [crop(shape=["1", 1, 48, 48])]}, 400, "shape"),
    ("negative dimension", {"inputs": [crop(shape=[-1, 1, 48, 48])]}, 400, "shape"),
    ("unknown datatype", {"inputs": [crop(datatype="FLOAT")]}, 400, "datatype"),
    ("wrong datatype", {"inputs": [crop(datatype="FP64")]}, 400, "must be FP32"),
    ("wrong crop size", {"inputs": [crop(shape=[1, 1, 64, 64], data=[0.0] * 4096)]}, 400,
     "[-1, 1, 48, 48]"),
    ("wrong rank", {"inputs": [crop(shape=[1, 48, 48])]}, 400, "[-1, 1, 48, 48]"),
    ("unknown input", {"inputs": [crop(name="pixels")]}, 400, "unknown input 'pixels'"),
    ("two inputs", {"inputs": [crop(), image_input([photo()])]}, 400, "exactly one input"),
    ("too few elements", {"inputs": [crop(data=ZERO_CROP[:-1])]}, 400, "2303 elements"),
    ("too many elements", {"inputs": [crop(data=ZERO_CROP + [0.0])]}, 400, "2305 elements"),
    ("strings as FP32", {"inputs": [crop(data=["0.5"] * 2304)]}, 400, "must be numbers"),
    ("booleans as FP32", {"inputs": [crop(data=[True] * 2304)]}, 400, "must be numbers"),
    ("beyond float32", {"inputs": [crop(data=[1e39] * 2304)]}, 400, "finite"),
    ("NaN", b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [NaN]}]}',
     400, "NaN is not JSON"),
    ("no data", {"inputs": [{"name": "input", "shape": [1, 1, 48, 48], "datatype": "FP32"}]},
     400, "neither data"),
    ("image as FP32", {"inputs": [{"name": "image", "shape": [1], "datatype": "FP32",
                                   "data": [1.0]}]}, 400, "must be BYTES"),
    ("image of rank 2", {"inputs": [{**image_input([photo()]), "shape": [1, 1]}]}, 400,
     "shape [-1]"),
    ("image not base64", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                      "data": ["not base64!"]}]}, 400, "base64"),
    ("image numbers", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "data": [12]}]}, 400, "must be strings"),
    ("corrupt image", {"inputs": [image_input([photo(), photo()[:2000]])]}, 400,
     "image 1: the jpeg data is truncated"),
    ("not an image", {"inputs": [image_input([b"hello"])]}, 415, "image 0: not a supported"),
    ("pixel bomb", {"inputs": [image_input([png_header_claiming(30_000, 30_000)])]}, 413,
     "image 0: image is 30000x30000"),
    ("unknown output", {"inputs": [crop()], "outputs": [{"name": "boxes"}]}, 400,
     "unknown output 'boxes'"),
    ("classification of boxes", {"inputs": [image_input([photo()])], "outputs": [
        {"name": "boxes", "parameters": {"classification": 2}}]}, 400, "probabilities"),
    ("classification of 9", {"inputs": [crop()], "outputs": [
        {"name": "probabilities", "parameters": {"classification": 9}}]}, 400, "1 to 7"),
    ("shared memory input", {"inputs": [{**crop(), "data": None, "parameters": {
        "shared_memory_region": "r", "shared_memory_byte_size": 9216}}]}, 400, "shared memory"),
    ("shared memory output", {"inputs": [crop()], "outputs": [{"name": "probabilities",
        "parameters": {"shared_memory_region": "r"}}]}, 400, "shared memory"),
    ("binary_data not a bool", {"inputs": [crop()], "outputs": [
        {"name": "labels", "parameters": {"binary_data": "yes"}}]}, 400, "true or false"),
]


@pytest.mark.parametrize("name,body,status,message", BAD_JSON, ids=[b[0] for b in BAD_JSON])
def test_bad_requests_get_protocol_errors_and_the_service_goes_on(
    client: TestClient, name: str, body: object, status: int, message: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v2/models/cnn10/infer", content=content,
                           headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"] and message in response.json()["error"]
    assert client.post("/v2/models/cnn10/infer", json={"inputs": [crop()]}).status_code == 200


ONE_CROP = bytes(48 * 48 * 4)
BINARY_CROP = {"name": "input", "shape": [1, 1, 48, 48], "datatype": "FP32",
               "parameters": {"binary_data_size": len(ONE_CROP)}}
BAD_BINARY = [
    ("size disagrees with shape", {"inputs": [{**BINARY_CROP, "parameters": {
        "binary_data_size": len(ONE_CROP) - 4}}]}, [ONE_CROP[:-4]], "takes 9216"),
    ("fewer bytes than declared", {"inputs": [BINARY_CROP]}, [ONE_CROP[:100]], "only 100 follow"),
    ("bytes left over", {"inputs": [BINARY_CROP]}, [ONE_CROP, b"xx"], "2 bytes after"),
    ("data and binary", {"inputs": [{**BINARY_CROP, "data": ZERO_CROP}]}, [ONE_CROP], "both"),
    ("binary size negative", {"inputs": [{**BINARY_CROP, "parameters": {
        "binary_data_size": -1}}]}, [], "binary_data_size"),
    ("binary NaN", {"inputs": [BINARY_CROP]}, [np.full(2304, np.nan, "<f4").tobytes()], "finite"),
    ("BYTES length overruns", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                           "parameters": {"binary_data_size": 8}}]},
     [struct.pack("<I", 100) + b"abcd"], "declares 100 bytes"),
    ("BYTES count disagrees", {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                           "parameters": {"binary_data_size": 9}}]},
     [length_prefixed([b"hello"])], "holds 1 elements"),
    ("BYTES cut in a length", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                           "parameters": {"binary_data_size": 2}}]},
     [b"\x01\x00"], "4-byte length"),
]


@pytest.mark.parametrize("name,header,blobs,message", BAD_BINARY, ids=[b[0] for b in BAD_BINARY])
def test_binary_tensors_that_disagree_with_their_shape_are_400(
    client: TestClient, name: str, header: dict, blobs: list[bytes], message: str
) -> None:
    content, headers = binary_request(header, *blobs)
    response = client.post("/v2/models/cnn10/infer", content=content, headers=headers)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize("value,message", [("abc", "Inference-Header-Content-Length"),
                                           ("-3", "Inference-Header-Content-Length"),
                                           ("99999", "only")])
def test_a_bad_header_length_is_400(client: TestClient, value: str, message: str) -> None:
    response = client.post("/v2/models/cnn10/infer", content=b'{"inputs": []}',
                           headers={"Inference-Header-Content-Length": value})
    assert response.status_code == 400 and message in response.json()["error"]


def test_a_compressed_body_is_refused(client: TestClient) -> None:
    body = gzip.compress(json.dumps({"inputs": [crop()]}).encode())
    response = client.post("/v2/models/cnn10/infer", content=body,
                           headers={"content-encoding": "gzip"})
    assert response.status_code == 415 and "Content-Encoding" in response.json()["error"]


def test_the_limits_of_predict_apply(model_store: Path) -> None:
    with running_app(model_store, max_body_bytes=100_000, max_queue_faces=4,
                     max_inflight_requests=2, max_pixels=60_000) as c:
        too_big = c.post("/v2/models/cnn10/infer", content=b"{" + b" " * 100_001 + b"}")
        assert too_big.status_code == 413 and list(too_big.json()) == ["error"]
        five = {"inputs": [crop(shape=[5, 1, 48, 48], data=ZERO_CROP * 5)]}
        response = c.post("/v2/models/cnn10/infer", json=five)
        assert response.status_code == 413 and "FER_MAX_QUEUE_FACES" in response.json()["error"]
        three = c.post("/v2/models/cnn10/infer", json={"inputs": [image_input([photo()] * 3)]})
        assert three.status_code == 413 and "3 images" in three.json()["error"]
        large = c.post("/v2/models/cnn10/infer", json={"inputs": [image_input([photo()])]})
        assert large.status_code == 413 and "the limit is 60000" in large.json()["error"]
        four = {"inputs": [crop(shape=[4, 1, 48, 48], data=ZERO_CROP * 4)]}
        assert c.post("/v2/models/cnn10/infer", json=four).status_code == 200


def test_api_keys_and_rate_limits_guard_inference_only(model_store: Path) -> None:
    request = {"inputs": [crop()]}
    with running_app(model_store, api_keys="v2-key", rate_limit_per_minute=2) as c:
        refused = c.post("/v2/models/cnn10/infer", json=request)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert list(refused.json()) == ["error"]
        for path in ("/v2", "/v2/health/ready", "/v2/models/cnn10", "/v2/models/cnn10/ready"):
            assert c.get(path).status_code == 200
        for headers in ({"Authorization": "Bearer v2-key"}, {"X-API-Key": "v2-key"}):
            served = c.post("/v2/models/cnn10/infer", json=request, headers=headers)
            assert served.status_code == 200
        limited = c.post("/v2/models/cnn10/infer", json=request, headers={"X-API-Key": "v2-key"})
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert "too many requests" in limited.json()["error"]


def test_requests_and_faces_are_counted(client: TestClient) -> None:
    def count(name: str, labels: dict | None = None) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0

    labels = {"endpoint": "/v2/models/{name}/infer", "method": "POST", "status": "200"}
    versioned = {**labels, "endpoint": "/v2/models/{name}/versions/{version}/infer"}
    before = (count("fer_requests_total", labels), count("fer_requests_total", versioned),
              count("fer_faces_detected_total"))
    crops = {"inputs": [crop(shape=[3, 1, 48, 48], data=ZERO_CROP * 3)]}
    assert client.post("/v2/models/cnn10/infer", json=crops).status_code == 200
    assert client.post("/v2/models/cnn10/versions/1/infer",
                       json={"inputs": [image_input([photo()])]}).status_code == 200
    assert count("fer_requests_total", labels) == before[0] + 1
    assert count("fer_requests_total", versioned) == before[1] + 1
    assert count("fer_faces_detected_total") == before[2] + 3 + 1


def test_the_docs_show_the_protocol(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = [path for path in spec["paths"] if path.startswith("/v2")]
    assert set(paths) == {
        "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}",
        "/v2/models/{name}/versions/{version}", "/v2/models/{name}/ready",
        "/v2/models/{name}/versions/{version}/ready", "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer"}
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json",
                                                    "application/octet-stream"}
    assert "Inference-Header-Content-Length" in [p["name"] for p in infer["parameters"]]
    assert infer["security"] and "security" not in spec["paths"]["/v2/models/{name}"]["get"]
