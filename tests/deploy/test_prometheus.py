"""deploy/prometheus: promtool checks, and a real Prometheus scraping a real service."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from service.metrics import BATCH_BUCKETS, LATENCY_BUCKETS
from tests.conftest import photo
from tests.deploy.conftest import (
    PROMETHEUS_DIR,
    ROOT,
    Server,
    free_port,
    load_yaml,
    run,
    stop,
    tool,
    wait_for,
)
from tests.deploy.test_grafana import (
    PROMETHEUS_SERIES,
    dashboard_exprs,
    exposed_names,
    metric_names,
)

CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = ROOT / "tests" / "deploy" / "alerts_test.yml"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


# -- static checks --------------------------------------------------------------------------
def test_promtool_check_config() -> None:
    result = run([tool("promtool"), "check", "config", str(CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_check_rules() -> None:
    result = run([tool("promtool"), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests() -> None:
    result = run([tool("promtool"), "test", "rules", str(ALERT_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        line.split(":", 1)[1].strip()
        for line in ALERT_TESTS.read_text().splitlines()
        if line.strip().startswith("alertname:")
    }
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert has a unit test"


def test_required_alerts_use_existing_metrics() -> None:
    rules = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert 'status=~"5.."' in rules["FerHigh5xxRate"]
    assert "histogram_quantile(0.99" in rules["FerHighP99Latency"]
    assert "fer_request_latency_seconds_bucket" in rules["FerHighP99Latency"]
    assert rules["FerApiDown"].startswith("up{")
    assert (
        "fer_models_loaded" in rules["FerNoModelsLoaded"] and "== 0" in rules["FerNoModelsLoaded"]
    )
    known = exposed_names() | PROMETHEUS_SERIES
    for name, expr in rules.items():
        assert metric_names(expr) <= known, name
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert {"summary", "description"} <= set(rule["annotations"])


def test_scrape_config_targets_the_api() -> None:
    (job,) = load_yaml(CONFIG)["scrape_configs"]
    assert job["job_name"] == "fer-api" and job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["api", "api-gpu"] and sd["port"] == 8000
    compose = load_yaml(ROOT / "docker-compose.yml")
    assert set(sd["names"]) <= set(compose["services"])


# -- a real Prometheus ----------------------------------------------------------------------
def live_config(api_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml, with the api at 127.0.0.1 and every interval 1s."""
    config = load_yaml(CONFIG)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{api_port}"]}]
    return config


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def api(self, path: str) -> Any:
        body = httpx.get(f"{self.url}/api/v1/{path}", timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]


@pytest.fixture(scope="module")
def prometheus(
    api_server: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(live_config(api_server.port)))
    port = free_port()
    log = folder / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text()
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200

        wait_for(ready, 30, "prometheus /-/ready")
        yield Prometheus(url)
    finally:
        stop(process)


def test_prometheus_scrapes_the_running_service(prometheus: Prometheus, api_server: Server) -> None:
    image = photo("happy/Marilyn_Monroe_0002.jpg")
    for _ in range(3):
        response = httpx.post(
            f"{api_server.url}/predict?model=ensemble",
            files={"image": ("face.jpg", image, "image/jpeg")},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.json()["faces"], "the fixture photo has a face"

    def series(expr: str, minimum: float = 1) -> list[dict[str, Any]] | None:
        result = prometheus.query(expr)
        return result if result and sum(float(s["value"][1]) for s in result) >= minimum else None

    instance = f"127.0.0.1:{api_server.port}"
    requests = wait_for(
        lambda: series(
            'fer_requests_total{job="fer-api", endpoint="/predict", method="POST", status="200"}', 3
        ),
        30,
        "fer_requests_total in Prometheus",
        interval=0.5,
    )
    assert {s["metric"]["instance"] for s in requests} == {instance}

    latency = wait_for(
        lambda: series('fer_request_latency_seconds_bucket{endpoint="/predict"}', 3),
        30,
        "fer_request_latency_seconds_bucket",
        interval=0.5,
    )
    buckets = {float(s["metric"]["le"]): float(s["value"][1]) for s in latency}
    assert set(buckets) == {*map(float, LATENCY_BUCKETS), float("inf")}
    counts = [buckets[le] for le in sorted(buckets)]
    assert counts == sorted(counts) and counts[-1] >= 3  # cumulative

    batches = wait_for(
        lambda: series('fer_batch_size_bucket{le="+Inf"}', 2),
        30,
        "fer_batch_size_bucket",
        interval=0.5,
    )
    # The ensemble was asked for: both members ran batches.
    assert {"cnn10", "resnet"} <= {s["metric"]["model"] for s in batches}
    assert (
        len(prometheus.query('fer_batch_size_bucket{model="resnet", version="1"}'))
        == len(BATCH_BUCKETS) + 1
    )

    assert float(prometheus.query('up{job="fer-api"}')[0]["value"][1]) == 1
    assert float(prometheus.query("fer_models_loaded")[0]["value"][1]) >= 2


def test_alert_rules_load_and_stay_silent_on_a_healthy_service(prometheus: Prometheus) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = wait_for(evaluated, 30, "the alert rules to be evaluated", interval=0.5)
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # Until the first scrape lands, FerApiAbsent may go pending; after it, nothing is active.
    wait_for(lambda: prometheus.api("alerts")["alerts"] == [], 20, "no active alert", interval=0.5)


def test_every_dashboard_and_alert_query_runs(prometheus: Prometheus) -> None:
    queries = [expr for _, expr in dashboard_exprs()] + [r["expr"] for r in alert_rules()]
    for expr in queries:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        prometheus.query(expr)  # asserts Prometheus parsed and ran it
    assert prometheus.query('sum(up{job="fer-api", instance=~".*"})')
