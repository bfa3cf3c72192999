"""The logs carry request ids and never the uploaded image bytes, whatever happens to them."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest

from service.logs import RedactApiKeys
from tests.conftest import photo, running_app

# 48+ characters of one base64 or hex alphabet, or anything outside printable ASCII
BINARY_GARBAGE = re.compile(r"[A-Za-z0-9+/=]{48,}|[^\x20-\x7e\t\n]")


def check_clean(text: str) -> None:
    for line in text.splitlines():
        assert len(line) < 600, f"a suspiciously long log line: {line[:200]}..."
        found = BINARY_GARBAGE.search(line)
        assert found is None, f"binary-looking log content {found.group()[:60]!r} in: {line[:200]}"
        assert "JFIF" not in line and "Exif" not in line and "IHDR" not in line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_name_the_request_and_hold_no_image_bytes(model_store: Path, log_format: str) -> None:
    with running_app(model_store, log_format=log_format, log_level="DEBUG") as client:
        buffer = io.StringIO()
        handler = logging.getLogger("service").handlers[0]
        handler.setStream(buffer)
        rid = "log-check-0001"
        data = photo()
        response = client.post("/predict", content=data, headers={"X-Request-ID": rid})
        assert response.status_code == 200
        client.post("/predict", files={"image": ("x.jpg", data, "image/jpeg")})
        client.post("/predict", content=data[: len(data) // 2])  # truncated
        client.post("/predict", content=b"\xff\xd8\xff" + data[3:] + b"\x00" * 999)  # corrupt
        client.post("/predict?model=" + "A" * 60, content=data)  # unknown model, long name
        client.post("/predict", content=b"junk" * 500, headers={"content-type": "text/plain"})
        with client.websocket_connect("/v1/stream", headers={"X-Request-ID": "log-check-ws"}) as ws:
            ws.send_bytes(data)
            ws.receive_json()
            ws.send_bytes(b"not an image" * 100)
            ws.receive_json()
        text = buffer.getvalue()

    assert text, "nothing was logged"
    check_clean(text)
    lines = text.splitlines()
    access = [line for line in lines if rid in line]
    assert access and any("/predict" in line and "200" in line for line in access)
    assert any("log-check-ws" in line and "stream" in line for line in lines)
    if log_format == "json":
        entries = [json.loads(line) for line in lines]
        assert any(e["request_id"] == rid and e.get("status") == 200 for e in entries)


def test_the_redaction_filter_is_installed_on_uvicorns_loggers(model_store: Path) -> None:
    with running_app(model_store):
        for name in ("uvicorn.access", "uvicorn.error"):
            filters = logging.getLogger(name).filters
            # once, however many apps were made
            assert sum(isinstance(f, RedactApiKeys) for f in filters) == 1
