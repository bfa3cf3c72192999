"""Same-run comparison of server configurations: `python -m bench.ab --server ... --server ...`.

Each `--server` is a comma list of key=value: `label=` (a name), `root=` (the checkout to
run, default this one: compare code by exporting the old version, e.g.
`mkdir -p .cache/baseline && git archive HEAD service | tar -x -C .cache/baseline`),
`cpus=` (cores to pin it to, `0` or `0+1`: the same as `taskset -c`), `workers=`
(uvicorn --workers; metrics then go through PROMETHEUS_MULTIPROC_DIR), and any FER_*
setting. All servers start at once on the same store, idle ones cost nothing, and the
load (bench.load's `run_level`) visits them in turn for `--repeats` rounds at each
concurrency, so background load hits every configuration alike. Per configuration the
median round is printed: images/s, latency, server CPU per image (all its processes),
the mean inference batch and the mean time per stage (from /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bench.load import batch_totals, load_photos, run_level
from bench.server import HTTP_OPTIONS, free_port
from bench.stores import resolve_store

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("decode", "detect", "preprocess", "inference")


class Server:
    def __init__(self, spec: str, store: Path) -> None:
        options = dict(item.split("=", 1) for item in spec.split(",") if item)
        self.label = options.pop("label", spec)
        root = Path(options.pop("root", str(ROOT))).resolve()
        cpus = options.pop("cpus", None)
        workers = int(options.pop("workers", "1"))
        self.env = {"FER_RELOAD_INTERVAL_S": "0", "FER_LOG_LEVEL": "WARNING", **options}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "FER_MODEL_STORE": str(store), "PYTHONPATH": str(root), **self.env}
        self.multiproc = None
        if workers > 1:
            self.multiproc = tempfile.mkdtemp(prefix="fer-metrics-")
            env["PROMETHEUS_MULTIPROC_DIR"] = self.multiproc
        affinity = {int(c) for c in cpus.split("+")} if cpus else None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning", "--workers", str(workers),
             *HTTP_OPTIONS],
            cwd=root, env=env, preexec_fn=(lambda: os.sched_setaffinity(0, affinity))
            if affinity else None,
        )
        self.describe = f"root={root.relative_to(ROOT) if root.is_relative_to(ROOT) else root}" \
                        f" cpus={cpus or 'all'} workers={workers} {self.env}"

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise SystemExit(f"server {self.label} exited with {self.process.returncode}")
            time.sleep(0.2)
        raise SystemExit(f"server {self.label} did not become ready")

    def cpu_seconds(self) -> float:
        try:
            root = psutil.Process(self.process.pid)
            total = 0.0
            for proc in [root, *root.children(recursive=True)]:
                times = proc.cpu_times()
                total += times.user + times.system
            return total
        except psutil.NoSuchProcess:
            return 0.0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if self.multiproc:
            shutil.rmtree(self.multiproc, ignore_errors=True)


def stage_totals(text: str) -> dict[str, tuple[float, float]]:
    """{stage: (seconds summed, observations)} from fer_stage_latency_seconds."""
    sums: dict[str, list[float]] = {s: [0.0, 0.0] for s in STAGES}
    for line in text.splitlines():
        match = re.match(r'fer_stage_latency_seconds_(sum|count)\{stage="(\w+)"\} (\S+)', line)
        if match and match[2] in sums:
            sums[match[2]][0 if match[1] == "sum" else 1] += float(match[3])
    return {s: (v[0], v[1]) for s, v in sums.items()}


async def one_round(client: httpx.AsyncClient, server: Server, photos: list[bytes],
                    concurrency: int, seconds: float, query: str) -> dict[str, float]:
    before_metrics = (await client.get(f"{server.url}/metrics")).text
    cpu = server.cpu_seconds()
    row = await run_level(client, server.url, photos, concurrency, seconds, query)
    cpu = server.cpu_seconds() - cpu
    after_metrics = (await client.get(f"{server.url}/metrics")).text
    if row["errors"]:
        print(f"# {server.label}: {row['errors']} errors {row['statuses']}", flush=True)
    stages_before, stages_after = stage_totals(before_metrics), stage_totals(after_metrics)
    faces = batch_totals(after_metrics)[0] - batch_totals(before_metrics)[0]
    batches = batch_totals(after_metrics)[1] - batch_totals(before_metrics)[1]
    result = {**row, "cpu_ms": 1000 * cpu / max(row["requests"], 1),
              "batch": faces / batches if batches else 0.0}
    for stage in STAGES:
        total = stages_after[stage][0] - stages_before[stage][0]
        count = stages_after[stage][1] - stages_before[stage][1]
        result[f"{stage}_ms"] = 1000 * total / count if count else 0.0
    return result


async def run(args: argparse.Namespace, servers: list[Server]) -> None:
    photos = load_photos(Path(args.photos))
    params = [f"model={args.model}"] * bool(args.model) + ["detect=false"] * args.no_detect
    query = "?" + "&".join(params) if params else ""
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    print(f"# {len(photos)} photos from {args.photos}; {args.seconds:.1f}s rounds, "
          f"{args.repeats} alternating rounds per level, median shown; {os.cpu_count()} cores")
    for server in servers:
        print(f"#   {server.label}: {server.describe}")
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for server in servers:  # warm-up
            await run_level(client, server.url, photos, max(args.concurrency), 1.0, query)
        header = (f"{'server':<14} {'conc':>4} {'img/s':>7} {'ratio':>6} {'p50 ms':>7} "
                  f"{'p95 ms':>7} {'CPU ms/img':>10} {'batch':>5} "
                  + " ".join(f"{s[:6] + ' ms':>9}" for s in STAGES))
        print(header)
        print("-" * len(header))
        for concurrency in args.concurrency:
            rounds: dict[str, list[dict[str, float]]] = {s.label: [] for s in servers}
            for _ in range(args.repeats):
                for server in servers:
                    rounds[server.label].append(
                        await one_round(client, server, photos, concurrency, args.seconds, query))
            base = None
            for server in servers:
                rows = rounds[server.label]
                med = {k: statistics.median(r[k] for r in rows) for k in
                       ("rps", "p50_ms", "p95_ms", "cpu_ms", "batch",
                        *(f"{s}_ms" for s in STAGES))}
                base = base or med["rps"]
                print(f"{server.label:<14} {concurrency:>4} {med['rps']:>7.1f} "
                      f"{med['rps'] / base:>6.2f} {med['p50_ms']:>7.1f} {med['p95_ms']:>7.1f} "
                      f"{med['cpu_ms']:>10.1f} {med['batch']:>5.2f} "
                      + " ".join(f"{med[f'{s}_ms']:>9.2f}" for s in STAGES), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", action="append", required=True,
                        help="label=NAME,root=DIR,cpus=0+1,workers=N,FER_X=V,...")
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "natural-faces"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--no-detect", action="store_true",
                        help="?detect=false: each photo is one face, no detection (the "
                             "inference-bound case, as with a GPU doing the rest)")
    parser.add_argument("--concurrency", default="1,8",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not Path(args.photos).is_dir():
        args.photos = str(ROOT / "tests" / "fixtures" / "faces")
    store = resolve_store(args.store)
    servers = [Server(spec, store) for spec in args.server]
    try:
        for server in servers:
            server.wait_ready()
        asyncio.run(run(args, servers))
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
