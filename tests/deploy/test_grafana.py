"""The Grafana dashboard and its provisioning; every query names metrics the service has."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from service import metrics
from tests.deploy.conftest import DASHBOARD, GRAFANA_DIR, load_yaml

SUFFIXES = {
    "counter": ["_total", "_created"],
    "gauge": [""],
    "histogram": ["_bucket", "_sum", "_count", "_created"],
}
# Series Prometheus itself adds to every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
FER_NAME = re.compile(r"\bfer_[a-z0-9_]+\b")


def exposed_names() -> set[str]:
    """Every series name /metrics can show, from the metric objects of service/metrics.py."""
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            names.update(value._name + suffix for suffix in SUFFIXES[value._type])
    return names


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects: fer_* names, plus Prometheus' own."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    names = set(FER_NAME.findall(without_strings))
    names.update(n for n in PROMETHEUS_SERIES if re.search(rf"\b{n}\s*[{{\[]", without_strings))
    return names


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [p for p in found if p["type"] != "row"]


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p["targets"]]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_exposed_names_cover_the_service_metrics() -> None:
    names = exposed_names()
    assert {
        "fer_requests_total",
        "fer_request_latency_seconds_bucket",
        "fer_batch_size_bucket",
        "fer_queue_depth",
        "fer_streams_open",
        "fer_stream_frames_total",
    } <= names


def test_every_query_names_only_existing_metrics(dashboard: dict[str, Any]) -> None:
    known = exposed_names() | PROMETHEUS_SERIES
    for title, expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"{title}: {expr} selects no metric"
        assert names <= known, f"{title}: unknown {names - known}"


def test_required_panels(dashboard: dict[str, Any]) -> None:
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels(dashboard)}

    def panel_with(pattern: str) -> str:
        found = [title for title, exprs in by_title.items() if re.search(pattern, exprs)]
        assert found, pattern
        return found[0]

    assert "status" in panel_with(r"sum by \(status\) \(rate\(fer_requests_total")
    latency = by_title[panel_with(r"fer_request_latency_seconds_bucket")]
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in latency
    panel_with(r"rate\(fer_faces_detected_total")
    batch = panel_with(r"fer_batch_size_bucket")
    assert next(p for p in panels(dashboard) if p["title"] == batch)["type"] == "heatmap"
    panel_with(r"fer_queue_depth")
    assert "model, version" in by_title[panel_with(r"fer_inference_latency_seconds_bucket")]
    panel_with(r"fer_streams_open")
    assert "outcome" in by_title[panel_with(r"fer_stream_frames_total")]


def test_layout_and_ids(dashboard: dict[str, Any]) -> None:
    everything = dashboard["panels"]
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids))
    for panel in everything:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    for panel in panels(dashboard):
        refs = {t["refId"] for t in panel["targets"]}
        assert len(refs) == len(panel["targets"]), panel["title"]
    assert dashboard["uid"] == "fer-service"


def test_data_source_is_the_variable_whose_default_is_provisioned(
    dashboard: dict[str, Any],
) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
    provisioned = load_yaml(GRAFANA_DIR / "provisioning/datasources/prometheus.yml")
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"
    assert variables["datasource"]["current"]["value"] == source["uid"]
    used = set(re.findall(r"\$(\w+)", json.dumps(dashboard))) - {"__rate_interval", "__all"}
    assert used <= set(variables) | {"labels", "value"}, used


def test_dashboard_provider(dashboard: dict[str, Any]) -> None:
    provider = load_yaml(GRAFANA_DIR / "provisioning/dashboards/fer.yml")["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
