import shutil
import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.card import CLASSES
from service.settings import Settings
from tests.conftest import photo, running_app


def test_models_lists_every_loaded_model_with_its_card(client):
    body = client.get("/v1/models").json()
    assert body["default_model"] == "cnn10"
    assert [m["name"] for m in body["models"]] == ["cnn10", "resnet", "ensemble"]
    cnn10 = body["models"][0]
    assert cnn10["latest_version"] == 1 and cnn10["classes"] == list(CLASSES)
    (version,) = cnn10["versions"]
    assert version["provider"] == "CPUExecutionProvider" and version["input_size"] == 48
    assert version["metrics"] == {"note": "untrained test model"}
    assert body["failures"] == {}


def test_one_model_and_the_ensemble_can_be_described(client):
    assert client.get("/v1/models/resnet").json()["name"] == "resnet"
    ensemble = client.get("/v1/models/ensemble").json()
    assert ensemble["members"] == [{"name": "cnn10", "version": 1},
                                   {"name": "resnet", "version": 1}]
    missing = client.get("/v1/models/vgg")
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_model"


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok", "models_loaded": 0, "detail": ""}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models_loaded"] == 2


def test_not_ready_without_models_and_predict_says_why(tmp_path):
    settings = Settings(model_store=tmp_path, reload_interval_s=0)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 10
        while (client.get("/readyz").json()["detail"] == "loading models"
               and time.monotonic() < deadline):
            time.sleep(0.02)
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["detail"] == "no model version could be loaded"
        assert client.get("/healthz").status_code == 200
        refused = client.post("/predict", content=photo())  # configured, not loaded: retry
        assert refused.status_code == 503 and "no model" in refused.json()["detail"]
        assert refused.json()["error"] == "not_ready" and refused.headers["retry-after"]


def test_a_new_version_is_picked_up_by_polling(tmp_path, model_store: Path):
    shutil.copytree(model_store / "cnn10", tmp_path / "cnn10")
    settings = Settings(model_store=tmp_path, reload_interval_s=0.2, default_model="cnn10")
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        from tests.service.test_model_store import copy_version

        copy_version(tmp_path / "cnn10" / "1", tmp_path, "cnn10", 2)
        while client.get("/v1/models/cnn10").json()["latest_version"] != 2:
            assert time.monotonic() < deadline + 10, "version 2 was not picked up"
            time.sleep(0.05)
        assert client.post("/predict", content=photo()).json()["version"] == 2


def test_metrics_expose_the_documented_series(client):
    client.post("/predict?model=ensemble", content=photo())  # both members run
    client.post("/predict", content=b"junk")
    text = client.get("/metrics").text
    for name in [
        'fer_requests_total{endpoint="/predict",method="POST",status="200"}',
        'fer_requests_total{endpoint="/predict",method="POST",status="415"}',
        'fer_request_latency_seconds_bucket{endpoint="/predict",le="0.5"}',
        "fer_faces_detected_total",
        'fer_batch_size_bucket{le="1.0",model="cnn10",version="1"}',
        'fer_queue_wait_seconds_count{model="resnet",version="1"}',
        'fer_inference_latency_seconds_count{model="cnn10",version="1"}',
        'fer_stage_latency_seconds_count{stage="detect"}',
        "fer_models_loaded 2.0",
    ]:
        assert name in text, name


def test_openapi_documents_the_real_schemas(client):
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) >= {"multipart/form-data", "image/jpeg",
                                                      "image/png"}
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/PredictResponse")
    assert list(spec["components"]["schemas"]["Probabilities"]["properties"]) == list(CLASSES)
    assert client.get("/docs").status_code == 200


def test_json_logs_carry_the_request_id(model_store, capfd):
    with running_app(model_store, log_format="json") as client:
        response = client.post("/predict", content=photo(), headers={"x-request-id": "abc-123"})
        assert response.headers["x-request-id"] == "abc-123"
    err = capfd.readouterr().err
    line = next(line for line in err.splitlines() if '"abc-123"' in line)
    import json

    entry = json.loads(line)
    assert entry["request_id"] == "abc-123" and entry["status"] == 200
