"""Soak test: mixed load against one server for a long time, then a verdict.

    python -m bench.soak --minutes 10 --spawn          # starts uvicorn on ./model_store
    python -m bench.soak --minutes 10 --url http://127.0.0.1:8000 --pid <server pid>

Bounded load, all at once: `--workers` HTTP clients that each send one request at a
time (photos to POST /predict, raw and multipart, on every model; and bad inputs: junk
bytes, a truncated JPEG, an empty body, a wrong content type, bad and unknown query
values), and `--streams` WebSocket clients that run /v1/stream sessions of JPEG frames
made from the photos, sometimes in bursts (so that frames are dropped), with a ping and
a junk frame in each session.

Every request must get an answer: an HTTP response, or for a stream frame a reply, or a
mention in a later reply's `dropped`. One that gets none (connection error, timeout,
frame never accounted for) is *lost*. Every answer must be the expected one (200 for a
photo, the right 4xx for each bad input). The server's RSS (from its pid) is sampled
all along; its growth is measured from the end of the warm-up (the first fifth of the
run) to the end of the run.

Exit status 1 if anything answered 5xx, was lost or got an unexpected answer, if the
spawned server logged an error, or if the RSS grew by more than `--max-rss-growth` %.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import httpx
import numpy as np

from bench.load import load_photos
from bench.server import free_port, spawn_server

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PHOTOS = ROOT / "tests" / "fixtures" / "faces"
SERVER_ERRORS = {"overloaded", "inference_failed", "internal_error"}  # 5xx-class stream errors


def stream_frames(photos: list[bytes], side: int = 320) -> list[bytes]:
    """The photos as a client's camera frames: resized, re-encoded as JPEG."""
    frames = []
    for data in photos:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        frame = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
        frames.append(cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes())
    return frames


def bad_inputs(photo: bytes) -> list[tuple[str, str, dict, int]]:
    """(name, query, httpx request arguments, expected status)."""
    rng = random.Random(0)
    junk = bytes(rng.randrange(256) for _ in range(4096))
    jpeg = {"content-type": "image/jpeg"}
    return [
        ("junk", "", {"content": junk, "headers": {"content-type": "application/octet-stream"}},
         415),
        ("truncated", "", {"content": photo[: len(photo) // 3], "headers": jpeg}, 400),
        ("empty", "", {"content": b"", "headers": jpeg}, 400),
        ("wrong_type", "", {"content": photo, "headers": {"content-type": "text/plain"}}, 415),
        ("bad_query", "?version=abc", {"content": photo, "headers": jpeg}, 422),
        ("unknown_model", "?model=no-such-model", {"content": photo, "headers": jpeg}, 404),
        ("no_image_field", "", {"files": {"picture": ("f.jpg", photo, "image/jpeg")}}, 400),
    ]


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)  # "kind status" -> n
    server_errors: int = 0
    lost: int = 0
    unexpected: int = 0
    latencies: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the first few, to show

    def note(self, problem: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(problem)

    def http(self, kind: str, status: int, expected: int) -> None:
        self.counts[f"http {kind} {status}"] += 1
        if status >= 500:
            self.server_errors += 1
            self.note(f"{kind}: {status}")
        elif status != expected:
            self.unexpected += 1
            self.note(f"{kind}: {status}, expected {expected}")


# -- HTTP ---------------------------------------------------------------------------------
async def http_worker(client: httpx.AsyncClient, photos: list[bytes], models: list[str],
                      deadline: float, tally: Tally, rng: random.Random) -> None:
    bad = bad_inputs(photos[0])
    while time.monotonic() < deadline:
        if rng.random() < 0.25:
            kind, query, request, expected = rng.choice(bad)
        else:
            photo = rng.choice(photos)
            model = rng.choice(models)
            query = f"?model={model}" if model else ""
            if rng.random() < 0.3:
                kind = "predict_multipart"
                request = {"files": {"image": ("p.jpg", photo, "image/jpeg")}}
            else:
                kind = "predict"
                request = {"content": photo, "headers": {"content-type": "image/jpeg"}}
            expected = 200
        started = time.perf_counter()
        try:
            response = await client.post(f"/predict{query}", **request)
        except httpx.HTTPError as error:
            tally.lost += 1
            tally.counts[f"http {kind} lost"] += 1
            tally.note(f"{kind}: no answer ({type(error).__name__}: {error})")
            continue
        tally.http(kind, response.status_code, expected)
        if expected == 200 and response.status_code == 200:
            tally.latencies.append(time.perf_counter() - started)
            body = response.json()
            if not isinstance(body.get("faces"), list):
                tally.unexpected += 1
                tally.note(f"{kind}: 200 without faces: {str(body)[:200]}")


# -- WebSocket ----------------------------------------------------------------------------
async def stream_session(url: str, frames: list[bytes], api_key: str | None, tally: Tally,
                         rng: random.Random, length: int, deadline: float) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    ws_url = url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/stream"
    if api_key:
        ws_url += f"?api_key={api_key}"
    sent = answered = errors = dropped = 0
    junk_at = rng.randrange(length)
    try:
        async with connect(ws_url, open_timeout=30, close_timeout=5) as ws:
            await ws.send(json.dumps({"command": "ping"}))
            pong = json.loads(await asyncio.wait_for(ws.recv(), 30))
            tally.counts["ws ping " + ("pong" if pong.get("pong") else "other")] += 1
            if not pong.get("pong"):
                tally.unexpected += 1
                tally.note(f"ws ping: {pong}")
            index = 0
            while index < length and time.monotonic() < deadline:
                burst = rng.choice((1, 1, 1, 3))  # a burst makes the server drop frames
                for _ in range(min(burst, length - index)):
                    frame = b"\x00junk" * 100 if index == junk_at else rng.choice(frames)
                    await ws.send(frame)
                    sent += 1
                    index += 1
                last = sent - 1
                while True:  # until the newest frame is answered (it is never dropped)
                    reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if "frame" not in reply:
                        continue
                    dropped += reply.get("dropped", 0)
                    if "error" in reply:
                        errors += 1
                        tally.counts[f"ws frame error:{reply['error']}"] += 1
                        if reply["error"] in SERVER_ERRORS:
                            tally.server_errors += 1
                            tally.note(f"ws frame {reply['frame']}: {reply}")
                        elif reply["frame"] != junk_at:
                            tally.unexpected += 1
                            tally.note(f"ws frame {reply['frame']}: {reply}")
                    else:
                        answered += 1
                        tally.counts["ws frame answered"] += 1
                    if reply["frame"] == last:
                        break
    except (OSError, TimeoutError, ConnectionClosed) as error:
        tally.counts["ws session broken"] += 1
        tally.unexpected += 1
        tally.note(f"ws session: {type(error).__name__}: {error}")
    tally.counts["ws frame dropped"] += dropped
    tally.counts["ws frame sent"] += sent
    unaccounted = sent - answered - errors - dropped
    if unaccounted:
        tally.lost += unaccounted
        tally.note(f"ws session: {unaccounted} of {sent} frames never accounted for")


async def stream_worker(url: str, frames: list[bytes], api_key: str | None, deadline: float,
                        tally: Tally, rng: random.Random) -> None:
    while time.monotonic() < deadline:
        await stream_session(url, frames, api_key, tally, rng, rng.randrange(10, 40), deadline)
        tally.counts["ws session done"] += 1


# -- server memory ------------------------------------------------------------------------
def rss_bytes(pid: int) -> int | None:
    """Resident memory of the server and its children (uvicorn --workers)."""
    try:
        import psutil
    except ImportError:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return None


async def sample_rss(pid: int, interval: float, deadline: float, samples: Samples,
                     started: float) -> None:
    while True:
        rss = rss_bytes(pid)
        if rss is not None:
            samples.append((time.monotonic() - started, rss))
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0.01)))


Samples = list[tuple[float, int]]  # (seconds since the start, RSS bytes)


def rss_growth(samples: Samples, duration: float, warmup: float) -> tuple[int, int, float]:
    """(baseline, end, growth %): medians just after the warm-up and over the last tenth."""
    window = max(duration * 0.1, 1e-9)
    after = [rss for t, rss in samples if warmup <= t <= warmup + window] or \
            [rss for t, rss in samples if t >= warmup][:3]
    end = [rss for t, rss in samples if t >= duration - window] or [samples[-1][1]]
    baseline, final = int(statistics.median(after)), int(statistics.median(end))
    return baseline, final, 100.0 * (final - baseline) / baseline


# -- running ------------------------------------------------------------------------------
async def soak(args: argparse.Namespace, pid: int | None) -> tuple[Tally, Samples, float]:
    photos = load_photos(Path(args.photos))
    frames = stream_frames(photos)
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.workers + 2)
    tally = Tally()
    samples: Samples = []
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                                 timeout=args.timeout) as client:
        listing = (await client.get("/v1/models")).json()
        models = [""] + [m["name"] for m in listing["models"]]  # "" = the default model
        started = time.monotonic()
        deadline = started + args.seconds
        seeds = itertools.count(args.seed)
        tasks = [http_worker(client, photos, models, deadline, tally, random.Random(next(seeds)))
                 for _ in range(args.workers)]
        tasks += [stream_worker(args.url, frames, args.api_key, deadline, tally,
                                random.Random(next(seeds))) for _ in range(args.streams)]
        if pid is not None:
            tasks.append(sample_rss(pid, args.sample_s, deadline, samples, started))
        await asyncio.gather(*tasks)
        duration = time.monotonic() - started
        ready = (await client.get("/readyz")).status_code
        if ready != 200:
            tally.unexpected += 1
            tally.note(f"/readyz is {ready} after the soak")
    return tally, samples, duration


def report(tally: Tally, samples: Samples, duration: float, args: argparse.Namespace,
           server_log: Path | None) -> int:
    failures = []
    http_total = sum(n for key, n in tally.counts.items() if key.startswith("http "))
    print(f"# soak: {duration:.0f} s against {args.url}: {args.workers} HTTP workers, "
          f"{args.streams} streams")
    print(f"{'answers':<40} {'count':>8}")
    for key in sorted(tally.counts):
        print(f"{key:<40} {tally.counts[key]:>8}")
    if tally.latencies:
        ms = np.asarray(tally.latencies) * 1000
        print(f"predict latency: p50 {np.percentile(ms, 50):.1f} ms, "
              f"p99 {np.percentile(ms, 99):.1f} ms")
    print(f"HTTP requests: {http_total}; stream frames: {tally.counts['ws frame sent']}")
    print(f"5xx: {tally.server_errors}")
    print(f"lost: {tally.lost}")
    print(f"unexpected: {tally.unexpected}")
    if tally.server_errors:
        failures.append(f"{tally.server_errors} server errors")
    if tally.lost:
        failures.append(f"{tally.lost} lost requests")
    if tally.unexpected:
        failures.append(f"{tally.unexpected} unexpected answers")
    if samples:
        warmup = duration * args.warmup
        step = max(1, len(samples) // 12)
        print("server RSS (MiB): " + ", ".join(f"{t:.0f}s {rss / 2**20:.0f}"
                                              for t, rss in samples[::step]))
        baseline, final, growth = rss_growth(samples, duration, warmup)
        print(f"RSS after warm-up ({warmup:.0f} s): {baseline / 2**20:.1f} MiB; at the end: "
              f"{final / 2**20:.1f} MiB; peak {max(r for _, r in samples) / 2**20:.1f} MiB; "
              f"growth {growth:+.1f} %")
        if growth > args.max_rss_growth:
            failures.append(f"RSS grew {growth:.1f} % (limit {args.max_rss_growth} %)")
    else:
        print("server RSS: not measured (give --pid, or --spawn)")
    if server_log is not None:
        logged = [line for line in server_log.read_text(errors="replace").splitlines()
                  if " ERROR " in line or line.startswith(("Traceback", "ERROR"))]
        print(f"server log: {server_log} ({len(logged)} error lines)")
        if logged:
            failures.append(f"the server logged {len(logged)} errors, e.g. {logged[0][:200]}")
    for problem in tally.problems:
        print(f"  problem: {problem}")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("PASS")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=None, help="overrides --minutes")
    parser.add_argument("--workers", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--streams", type=int, default=2, help="concurrent WebSocket clients")
    parser.add_argument("--photos", default=str(DEFAULT_PHOTOS))
    parser.add_argument("--api-key", default=os.environ.get("FER_SOAK_API_KEY"),
                        help="sent as X-API-Key and ?api_key= (for a server with FER_API_KEYS)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds without an answer before a request counts as lost")
    parser.add_argument("--pid", type=int, default=None, help="the server's pid, for its RSS")
    parser.add_argument("--sample-s", type=float, default=None, help="RSS sampling period")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the run")
    parser.add_argument("--max-rss-growth", type=float, default=10.0, help="percent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spawn", action="store_true", help="start a server on --store first")
    parser.add_argument("--store", default=str(ROOT / "model_store"))
    parser.add_argument("--port", type=int, default=0, help="for --spawn; 0 = a free one")
    parser.add_argument("--env", action="append", default=[], metavar="FER_X=VALUE",
                        help="settings for the spawned server")
    parser.add_argument("--server-log", default=None,
                        help="where the spawned server logs (default: a temporary file, "
                        "removed unless the soak fails)")
    args = parser.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else args.minutes * 60
    args.sample_s = args.sample_s or min(5.0, max(args.seconds / 40, 0.25))
    server = server_log = None
    pid = args.pid
    if args.spawn:
        env = dict(pair.split("=", 1) for pair in args.env)
        if args.api_key:
            env.setdefault("FER_API_KEYS", args.api_key)
        port = args.port or free_port()
        server_log = Path(args.server_log or tempfile.mkstemp(prefix="fer-soak-", suffix=".log")[1])
        server = spawn_server(Path(args.store), port, env, server_log)
        args.url, pid = f"http://127.0.0.1:{port}", server.pid
    try:
        tally, samples, duration = asyncio.run(soak(args, pid))
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    status = report(tally, samples, duration, args, server_log)
    if server_log is not None and status == 0 and not args.server_log:
        server_log.unlink()  # kept when the soak fails, or when asked for
    return status


if __name__ == "__main__":
    sys.exit(main())
