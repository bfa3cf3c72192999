"""Optional API keys and rate limits: /predict and /v1/stream guarded, everything else open."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from service import metrics
from service.auth import Guard, RateLimited, RateLimiter, Unauthorized, bearer_token
from service.logs import RedactApiKeys
from service.settings import Settings
from tests.conftest import photo, running_app

KEYS = "alpha-key-1,beta-key-2"


def rejected(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("fer_rejected_total", {"reason": reason}) or 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- units ------------------------------------------------------------------------------
def test_any_configured_key_is_accepted_and_others_are_not() -> None:
    guard = Guard(["one", "two"], per_minute=0)
    guard.admit(["two"], "1.2.3.4")
    guard.admit([None, "one"], None)  # the first credential missing, the second valid
    guard.admit(["wrong", "one"], None)  # any valid one is enough
    for presented in ([], [None, None], [""], ["twoo"], ["tw"], ["one "]):
        with pytest.raises(Unauthorized) as refused:
            guard.admit(presented, "1.2.3.4")
        assert refused.value.status == 401
        assert refused.value.headers == {"WWW-Authenticate": "Bearer"}


def test_no_keys_means_open_access() -> None:
    guard = Guard([], per_minute=0)
    assert not guard.keys_required
    guard.admit([], None)
    guard.admit(["anything"], "1.2.3.4")


def test_the_token_bucket_allows_a_minute_of_burst_then_refills() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=6, clock=clock)  # one token every 10 s
    assert [limiter.take("a") for _ in range(6)] == [0.0] * 6
    assert limiter.take("a") == pytest.approx(10.0)
    assert limiter.take("b") == 0.0  # buckets are per client
    clock.now += 10
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    clock.now += 3600  # refills up to the capacity, not beyond
    assert [limiter.take("a") for _ in range(7)].count(0.0) == 6


def test_the_limiter_remembers_a_bounded_number_of_clients() -> None:
    limiter = RateLimiter(per_minute=1, max_clients=100)
    for n in range(1000):
        limiter.take(f"ip:{n}")
    assert len(limiter._buckets) == 100


def test_rate_limits_are_per_key_or_per_ip() -> None:
    clock = Clock()
    keyed = Guard(["k1", "k2"], per_minute=1, clock=clock)
    keyed.admit(["k1"], "10.0.0.1")
    with pytest.raises(RateLimited) as limited:
        keyed.admit(["k1"], "10.0.0.2")  # same key from another address: same bucket
    assert limited.value.status == 429 and limited.value.headers == {"Retry-After": "60"}
    keyed.admit(["k2"], "10.0.0.1")
    open_guard = Guard([], per_minute=1, clock=clock)
    open_guard.admit([], "10.0.0.1")
    open_guard.admit([], "10.0.0.2")
    with pytest.raises(RateLimited):
        open_guard.admit([], "10.0.0.1")


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None


def test_settings_read_keys_from_the_environment_and_never_show_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FER_API_KEYS", " k-one , k-two,, ")
    monkeypatch.setenv("FER_RATE_LIMIT_PER_MINUTE", "120")
    settings = Settings()
    assert settings.api_key_list == ["k-one", "k-two"]
    assert settings.rate_limit_per_minute == 120
    assert "k-one" not in repr(settings) and "k-one" not in str(settings.model_dump())
    monkeypatch.delenv("FER_API_KEYS")
    assert Settings().api_key_list == []


def test_api_keys_in_uvicorn_request_lines_are_redacted() -> None:
    path = "/v1/stream?model=cnn10&api_key=s3cret&x=1"
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1,
                               '%s - "WebSocket %s" [accepted]', ("127.0.0.1:5000", path), None)
    assert RedactApiKeys().filter(record)
    message = record.getMessage()
    assert "s3cret" not in message and "api_key=[redacted]&x=1" in message


# -- the app ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(model_store: Path) -> Iterator[TestClient]:
    with running_app(model_store, api_keys=KEYS) as client:
        yield client


def test_predict_without_a_key_is_401(keyed: TestClient) -> None:
    before = rejected("unauthorized")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "nope"},
                    {"Authorization": "Basic YWxwaGEta2V5LTE="}, {"Authorization": "alpha-key-1"}):
        response = keyed.post("/predict", content=photo(), headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        body = response.json()
        assert body["error"] == "unauthorized" and body["detail"]
    assert rejected("unauthorized") == before + 5


def test_the_key_is_checked_before_anything_else(keyed: TestClient) -> None:
    """An unauthenticated client learns nothing about models or query rules."""
    assert keyed.post("/predict?version=abc", content=photo()).status_code == 401
    assert keyed.post("/predict?model=nope", content=photo()).status_code == 401


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer alpha-key-1"},
    {"Authorization": "bearer beta-key-2"},
    {"X-API-Key": "beta-key-2"},
])
def test_predict_with_a_key_is_served(keyed: TestClient, headers: dict[str, str]) -> None:
    response = keyed.post("/predict?model=cnn10", content=photo(), headers=headers)
    assert response.status_code == 200, response.text
    assert len(response.json()["faces"]) == 1


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/", "/static/app.js",
                                  "/docs", "/openapi.json", "/v1/models", "/v1/models/cnn10"])
def test_probes_docs_page_and_model_list_stay_open(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_a_stream_without_a_key_is_closed_with_1008(keyed: TestClient) -> None:
    for url in ("/v1/stream", "/v1/stream?api_key=wrong"):
        with keyed.websocket_connect(url) as ws:
            assert ws.receive_json()["error"] == "unauthorized"
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
        assert closed.value.code == 1008


@pytest.mark.parametrize("url,headers", [
    ("/v1/stream?model=cnn10&api_key=alpha-key-1", {}),
    ("/v1/stream?model=cnn10", {"X-API-Key": "beta-key-2"}),
    ("/v1/stream?model=cnn10", {"Authorization": "Bearer alpha-key-1"}),
])
def test_a_stream_with_a_key_is_served(
    keyed: TestClient, url: str, headers: dict[str, str]
) -> None:
    with keyed.websocket_connect(url, headers=headers) as ws:
        ws.send_bytes(photo())
        reply = ws.receive_json()
    assert reply["frame"] == 0 and len(reply["faces"]) == 1


def test_the_openapi_spec_declares_both_schemes(keyed: TestClient) -> None:
    spec = keyed.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerKey"] == {**schemes["bearerKey"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyHeader"] == {**schemes["apiKeyHeader"], "type": "apiKey",
                                       "in": "header", "name": "X-API-Key"}
    predict = spec["paths"]["/predict"]["post"]
    assert {name for requirement in predict["security"] for name in requirement} == set(schemes)
    assert {"401", "429"} <= set(predict["responses"])
    assert "security" not in spec["paths"]["/v1/models"]["get"]


def test_the_demo_page_passes_its_api_key_to_the_stream(keyed: TestClient) -> None:
    script = keyed.get("/static/app.js").text
    assert 'get("api_key")' in script and 'params.set("api_key"' in script


def test_rate_limit_per_key_gives_429_with_retry_after(model_store: Path) -> None:
    with running_app(model_store, api_keys=KEYS, rate_limit_per_minute=2) as client:
        before = rejected("rate_limited")
        alpha = {"X-API-Key": "alpha-key-1"}
        for _ in range(2):
            response = client.post("/predict?model=cnn10", content=photo(), headers=alpha)
            assert response.status_code == 200
        limited = client.post("/predict?model=cnn10", content=photo(), headers=alpha)
        assert limited.status_code == 429
        assert limited.json()["error"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 30
        assert rejected("rate_limited") == before + 1
        beta = {"Authorization": "Bearer beta-key-2"}  # another key, another bucket
        assert client.post("/predict?model=cnn10", content=photo(), headers=beta).status_code == 200
        # A bad key is refused as such, not rate limited; probes are never limited.
        bad_key = client.post("/predict", content=photo(), headers={"X-API-Key": "x"})
        assert bad_key.status_code == 401
        assert client.get("/readyz").status_code == 200
        with client.websocket_connect("/v1/stream?api_key=alpha-key-1") as ws:
            refusal = ws.receive_json()
            assert refusal["error"] == "rate_limited" and refusal["retry_after_s"] >= 1
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
        assert closed.value.code == 1013
