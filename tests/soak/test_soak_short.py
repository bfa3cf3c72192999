"""A short run of `bench.soak` (the long one: `python -m bench.soak --minutes 10 --spawn`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak import rss_growth
from tests.conftest import ROOT

SECONDS = 20


@pytest.mark.slow
def test_a_short_soak_has_no_5xx_no_lost_request_and_no_memory_growth(model_store: Path) -> None:
    """Photos, bad inputs and streams for 20 s against a spawned server with API keys on."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seconds", str(SECONDS), "--spawn",
         "--store", str(model_store), "--workers", "4", "--streams", "1", "--api-key", "soak-key",
         "--env", "FER_CPU_THREADS=1", "--env", "FER_ORT_THREADS=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 150,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert "5xx: 0" in out and "lost: 0" in out and "unexpected: 0" in out and "PASS" in out
    assert "http predict 200" in out and "http junk 415" in out and "http truncated 400" in out
    assert "ws frame answered" in out
    assert "growth" in out and "(0 error lines)" in out


def test_rss_growth_compares_just_after_warm_up_with_the_end() -> None:
    flat = [(t, 100) for t in range(100)]
    assert rss_growth(flat, duration=100, warmup=20) == (100, 100, 0.0)
    warming = [(t, 50 + t if t < 20 else 100) for t in range(100)]  # start-up growth is ignored
    assert rss_growth(warming, duration=100, warmup=20)[2] == 0.0
    leaking = [(t, 100 + t) for t in range(100)]
    baseline, end, growth = rss_growth(leaking, duration=100, warmup=20)
    assert (baseline, end) == (125, 194) and growth == pytest.approx(55.2)
