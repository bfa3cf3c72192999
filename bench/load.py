"""Load generator for a running service: `python -m bench.load --url http://127.0.0.1:8000`.

Drives POST /predict with real photos at each concurrency level for a fixed time and
prints requests/s, faces/s, latency percentiles, errors and the batch sizes the
server formed (from its /metrics). `--spawn` starts `uvicorn service.app:app` itself
on the committed models (or --store) and stops it afterwards, once per detector of
`--detectors` (default `haar,retinaface`: one table each, FER_DETECTOR set for each).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np

from bench.server import spawn_server

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PHOTOS = ROOT / "tests" / "fixtures" / "faces"


def load_photos(folder: Path) -> list[bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        raise SystemExit(f"no photos under {folder}")
    return [p.read_bytes() for p in paths]


def batch_totals(metrics_text: str) -> tuple[float, float]:
    """(faces, batches) summed over every model's fer_batch_size histogram."""
    faces = batches = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("fer_batch_size_sum"):
            faces += float(line.rsplit(" ", 1)[1])
        elif line.startswith("fer_batch_size_count"):
            batches += float(line.rsplit(" ", 1)[1])
    return faces, batches


async def run_workers(client: httpx.AsyncClient, url: str, worker: Callable[[], Awaitable[None]],
                      concurrency: int, latencies: list[float]) -> dict[str, float]:
    """Run `concurrency` copies of `worker`, which append answered requests' latencies to
    `latencies`; returns the timing figures and the mean batch the server formed."""
    before = batch_totals((await client.get(f"{url}/metrics")).text)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    after = batch_totals((await client.get(f"{url}/metrics")).text)
    batched_faces, batches = after[0] - before[0], after[1] - before[1]
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "concurrency": concurrency,
        "elapsed": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_batch": batched_faces / batches if batches else 0.0,
    }


async def run_level(client: httpx.AsyncClient, url: str, photos: list[bytes], concurrency: int,
                    seconds: float, query: str) -> dict[str, float]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    faces = 0
    errors = 0
    cycle = itertools.cycle(photos)
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal faces, errors
        while time.perf_counter() < deadline:
            data = next(cycle)
            started = time.perf_counter()
            try:
                response = await client.post(f"{url}/predict{query}", content=data,
                                             headers={"content-type": "image/jpeg"})
            except httpx.HTTPError:
                errors += 1
                continue
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                # Only answered predictions count: a fast 503 must not raise req/s or
                # lower the latency percentiles.
                latencies.append(time.perf_counter() - started)
                faces += len(response.json()["faces"])
            else:
                errors += 1

    summary = await run_workers(client, url, worker, concurrency, latencies)
    return {**summary, "requests": len(latencies) + errors,
            "faces_per_s": faces / summary["elapsed"], "errors": errors, "statuses": statuses}


def print_table(rows: list[dict[str, float]]) -> None:
    header = f"{'conc':>5} {'requests':>8} {'req/s':>8} {'faces/s':>8} {'p50 ms':>8} " \
             f"{'p95 ms':>8} {'p99 ms':>8} {'errors':>6} {'batch':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['concurrency']:>5} {r['requests']:>8} {r['rps']:>8.1f} {r['faces_per_s']:>8.1f} "
              f"{r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>6} "
              f"{r['mean_batch']:>6.2f}")


async def main_async(args: argparse.Namespace) -> list[dict[str, float]]:
    photos = load_photos(Path(args.photos))
    query = f"?model={args.model}" if args.model else ""
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await run_level(client, args.url, photos, 1, 1.0, query)  # warm-up
        rows = [await run_level(client, args.url, photos, c, args.seconds, query)
                for c in args.concurrency]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    parser.add_argument("--photos", default=str(DEFAULT_PHOTOS))
    parser.add_argument("--model", default=None, help="model query parameter (default: server's)")
    parser.add_argument("--spawn", action="store_true", help="start a server on --store first")
    parser.add_argument("--store", default=str(ROOT / "model_store"))
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--env", action="append", default=[], metavar="FER_X=VALUE",
                        help="settings for the spawned server")
    parser.add_argument("--detectors", default="haar,retinaface",
                        help="with --spawn: one server (and table) per FER_DETECTOR value")
    args = parser.parse_args(argv)
    if not args.spawn:
        rows = asyncio.run(main_async(args))
        print(f"# {len(load_photos(Path(args.photos)))} photos, {args.seconds:.0f}s per level, "
              f"{os.cpu_count()} cores, server {args.url}")
        print_table(rows)
        return
    env = dict(pair.split("=", 1) for pair in args.env)
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    if not detectors or set(detectors) - {"haar", "retinaface"}:
        raise SystemExit(f"--detectors: haar and/or retinaface, got {args.detectors!r}")
    args.url = f"http://127.0.0.1:{args.port}"
    for detector in detectors:
        server = spawn_server(Path(args.store), args.port, {**env, "FER_DETECTOR": detector})
        try:
            rows = asyncio.run(main_async(args))
        finally:
            server.terminate()
            server.wait(timeout=20)
        settings = ", ".join(f"{k}={v}" for k, v in env.items()) or "defaults"
        print(f"# FER_DETECTOR={detector} ({settings}): {len(load_photos(Path(args.photos)))} "
              f"photos, {args.seconds:.0f}s per level, {os.cpu_count()} cores, server {args.url}")
        print_table(rows)


if __name__ == "__main__":
    main()
