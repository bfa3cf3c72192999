"""A model version that fails at run time fails its own requests (500 inference_failed) only.

Each faulty graph is a tiny real ONNX model that loads, passes its signature check and
its warm-up (an all-zero face), and goes wrong on a real face: it raises inside ONNX
Runtime, returns logits of the wrong shape, or returns NaN.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.card import CARD_FILENAME, CLASSES, MODEL_FILENAME, InputSpec, ModelCard
from tests.conftest import photo, running_app

SIZE = 48


def faulty_graph(fault: str) -> bytes:
    """input [N,1,48,48] -> logits [N,7] (as declared); `fault` decides what really comes out.

    `nonzero` is 1 when any input value is non-zero: 0 for the warm-up, 1 for a real face.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    classes = len(CLASSES)
    weights = np.random.default_rng(0).normal(0, 0.01, (SIZE * SIZE, classes)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "weights"], ["scores"]),
        helper.make_node("Abs", ["input"], ["magnitude"]),
        helper.make_node("ReduceMax", ["magnitude"], ["peak"], keepdims=0),
        helper.make_node("Greater", ["peak", "zero"], ["is_nonzero"]),
        helper.make_node("Cast", ["is_nonzero"], ["nonzero_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["is_nonzero"], ["nonzero_scalar"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["nonzero_scalar", "one_dim"], ["nonzero"]),
    ]
    initializers = [
        numpy_helper.from_array(weights, "weights"),
        numpy_helper.from_array(np.array(0, np.float32), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one_dim"),
        numpy_helper.from_array(np.array([1], np.int64), "ones"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.array([classes], np.int64), "classes"),
        numpy_helper.from_array(np.array([4], np.int64), "four"),
        numpy_helper.from_array(np.array(1, np.float32), "one_f"),
    ]
    if fault == "raises":  # reshape to [-1, 7 + 4 * nonzero]: 11 columns cannot hold N x 7
        nodes += [
            helper.make_node("Mul", ["nonzero", "four"], ["extra"]),
            helper.make_node("Add", ["classes", "extra"], ["columns"]),
            helper.make_node("Concat", ["minus_one", "columns"], ["shape"], axis=0),
            helper.make_node("Reshape", ["scores", "shape"], ["logits"]),
        ]
    elif fault == "misshaped":  # tile to [N, 7 * (1 + nonzero)]
        nodes += [
            helper.make_node("Add", ["ones", "nonzero"], ["times"]),
            helper.make_node("Concat", ["ones", "times"], ["repeats"], axis=0),
            helper.make_node("Tile", ["scores", "repeats"], ["logits"]),
        ]
    elif fault == "nan":  # scores * (1 - nonzero) / (1 - nonzero): 0 / 0 on a real face
        nodes += [
            helper.make_node("Sub", ["one_f", "nonzero_f"], ["gate"]),
            helper.make_node("Mul", ["scores", "gate"], ["gated"]),
            helper.make_node("Div", ["gated", "gate"], ["logits"]),
        ]
    else:
        raise ValueError(fault)
    graph = helper.make_graph(
        nodes, f"faulty_{fault}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def add_version(store: Path, name: str, graph: bytes) -> None:
    folder = store / name / "1"
    folder.mkdir(parents=True)
    (folder / MODEL_FILENAME).write_bytes(graph)
    card = ModelCard(name=name, version=1, architecture=f"deliberately broken ({name})",
                     classes=list(CLASSES), input=InputSpec(mean=0.5, std=0.25))
    card.write(folder / CARD_FILENAME)


FAULTS = ["raises", "misshaped", "nan"]


@pytest.fixture(scope="module")
def client(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    store = tmp_path_factory.mktemp("faulty_store")
    shutil.copytree(model_store / "cnn10", store / "cnn10")
    for fault in FAULTS:
        add_version(store, fault, faulty_graph(fault))
    with running_app(store, ensemble="") as c:
        yield c


def test_every_faulty_version_loads_and_warms_up(client: TestClient) -> None:
    listing = client.get("/v1/models").json()
    assert {m["name"] for m in listing["models"]} == {"cnn10", *FAULTS}
    assert listing["failures"] == {}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_model_failing_at_run_time_is_a_json_500_and_others_keep_serving(
    client: TestClient, fault: str
) -> None:
    for _ in range(2):  # and again: the batcher survived the failure
        response = client.post(f"/predict?model={fault}", content=photo())
        assert response.status_code == 500, response.text
        body = response.json()
        assert body["error"] == "inference_failed" and body["detail"].startswith("the model failed")
        healthy = client.post("/predict?model=cnn10", content=photo())
        assert healthy.status_code == 200 and len(healthy.json()["faces"]) == 1
    assert client.get("/readyz").status_code == 200


def test_a_failing_model_fails_only_its_own_requests_under_concurrency(client: TestClient) -> None:
    from concurrent.futures import ThreadPoolExecutor

    models = ["cnn10", "raises", "cnn10", "nan", "cnn10", "misshaped"] * 3
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(
            lambda m: client.post(f"/predict?model={m}", content=photo()).status_code, models))
    assert statuses == [200 if m == "cnn10" else 500 for m in models]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_stream_on_a_failing_model_gets_an_error_reply_and_goes_on(
    client: TestClient, fault: str
) -> None:
    with client.websocket_connect(f"/v1/stream?model={fault}") as ws:
        ws.send_bytes(photo())
        reply = ws.receive_json()
        assert reply["frame"] == 0 and reply["error"] == "inference_failed"
        ws.send_json({"command": "set_model", "model": "cnn10"})
        assert ws.receive_json()["model"] == "cnn10"
        ws.send_bytes(photo())
        assert len(ws.receive_json()["faces"]) == 1
