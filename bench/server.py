"""Start `uvicorn service.app:app` on loopback for a benchmark, as the container runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
# The HTTP options the image's CMD and `make serve` run with (h11, with its 32 KiB cap on a
# request's line and headers), so that benchmarks time the server as it is deployed.
HTTP_OPTIONS = ["--http", "h11", "--h11-max-incomplete-event-size", "32768"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_server(store: Path, port: int, env: dict[str, str],
                 log: Path | None = None) -> subprocess.Popen:
    """The server process, once its /readyz answers 200 (output to `log` if given)."""
    out = log.open("wb") if log else None
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning", *HTTP_OPTIONS],
            cwd=ROOT, env={**os.environ, "FER_MODEL_STORE": str(store), **env},
            stdout=out, stderr=subprocess.STDOUT if out else None,
        )
    finally:
        if out:
            out.close()
    where = f"; see {log}" if log else ""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}{where}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the spawned server did not become ready{where}")
