"""Faces/s through the Open Inference Protocol against /predict: `python -m bench.v2 --spawn`.

The same 48x48 FER2013 faces (tests/fixtures/fer_mini) go to a running service three
ways, each for a fixed time at each client count:

* `predict`: POST /predict?detect=false, one face (its PNG) per request;
* `v2 b1` / `v2 b32`: POST /v2/models/<model>/infer with `input` FP32 [1 or 32, 1, 48, 48],
  normalised as the model's metadata says, in Triton's binary tensor form (what the
  Triton client sends by default), `probabilities` asked for as binary;
* with `--json`, also `v2 json b32`: the same batch as JSON tensors.

It prints requests/s, faces/s, latency percentiles, errors and the mean batch the
server's dynamic batcher formed (from /metrics). `--spawn` starts `uvicorn
service.app:app` on the committed models (or --store) and stops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import httpx
import numpy as np

from bench.load import run_workers
from bench.models import cores
from bench.server import spawn_server
from service.card import InputSpec
from service.preprocess import normalize

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FACES = ROOT / "tests" / "fixtures" / "fer_mini"

Request = tuple[str, bytes, dict[str, str], int]  # path, body, headers, faces in it


def load_faces(folder: Path) -> list[Path]:
    paths = sorted(folder.rglob("*.png"))
    if not paths:
        raise SystemExit(f"no PNG faces under {folder}")
    return paths


def predict_requests(faces: list[Path], model: str) -> list[Request]:
    headers = {"content-type": "image/png"}
    return [(f"/predict?model={model}&detect=false", path.read_bytes(), headers, 1)
            for path in faces]


def normalised_crops(faces: list[Path], mean: float, std: float) -> np.ndarray:
    gray = np.stack([cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) for path in faces])
    return normalize(gray, InputSpec(mean=mean, std=std))


def v2_requests(crops: np.ndarray, model: str, batch: int, binary: bool) -> list[Request]:
    requests = []
    for start in range(0, len(crops) - batch + 1, batch):
        chunk = crops[start : start + batch]
        tensor = {"name": "input", "shape": list(chunk.shape), "datatype": "FP32"}
        wanted = [{"name": "probabilities", "parameters": {"binary_data": binary}}]
        if binary:
            tensor["parameters"] = {"binary_data_size": chunk.nbytes}
            header = json.dumps({"inputs": [tensor], "outputs": wanted}).encode()
            body = header + chunk.astype("<f4").tobytes()
            headers = {"Inference-Header-Content-Length": str(len(header)),
                       "content-type": "application/octet-stream"}
        else:
            tensor["data"] = chunk.ravel().tolist()
            body = json.dumps({"inputs": [tensor], "outputs": wanted}).encode()
            headers = {"content-type": "application/json"}
        requests.append((f"/v2/models/{model}/infer", body, headers, batch))
    return requests


async def run_level(client: httpx.AsyncClient, url: str, requests: list[Request],
                    concurrency: int, seconds: float,
                    answered: Callable[[httpx.Response, int], bool]) -> dict[str, float]:
    latencies: list[float] = []
    faces = errors = 0
    cycle = itertools.cycle(requests)
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal faces, errors
        while time.perf_counter() < deadline:
            path, body, headers, count = next(cycle)
            started = time.perf_counter()
            try:
                response = await client.post(url + path, content=body, headers=headers)
            except httpx.HTTPError:
                errors += 1
                continue
            if response.status_code == 200 and answered(response, count):
                latencies.append(time.perf_counter() - started)
                faces += count
            else:
                errors += 1

    summary = await run_workers(client, url, worker, concurrency, latencies)
    return {**summary, "faces_per_s": faces / summary["elapsed"], "errors": errors}


def predict_answered(response: httpx.Response, faces: int) -> bool:
    return len(response.json()["faces"]) == faces


def v2_answered(response: httpx.Response, faces: int) -> bool:
    length = response.headers.get("inference-header-content-length")
    document = json.loads(response.content[: int(length)] if length else response.content)
    return document["outputs"][0]["shape"] == [faces, 7]


async def main_async(args: argparse.Namespace) -> list[tuple[str, dict[str, float]]]:
    faces = load_faces(Path(args.faces))
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        metadata = (await client.get(f"{args.url}/v2/models/{args.model}")).json()
        if "parameters" not in metadata:
            raise SystemExit(f"no metadata for {args.model}: {metadata}")
        crops = normalised_crops(faces, metadata["parameters"]["input_mean"],
                                 metadata["parameters"]["input_std"])
        ways = [("predict", predict_requests(faces, args.model), predict_answered),
                ("v2 b1", v2_requests(crops, args.model, 1, True), v2_answered),
                ("v2 b32", v2_requests(crops, args.model, 32, True), v2_answered)]
        if args.json:
            ways.append(("v2 json b32", v2_requests(crops, args.model, 32, False), v2_answered))
        rows = []
        for label, requests, answered in ways:
            await run_level(client, args.url, requests, 1, 1.0, answered)  # warm-up
            for concurrency in args.concurrency:
                rows.append((label, await run_level(client, args.url, requests, concurrency,
                                                    args.seconds, answered)))
    return rows


def print_table(rows: list[tuple[str, dict[str, float]]]) -> None:
    header = (f"{'way':<12} {'clients':>7} {'req/s':>8} {'faces/s':>8} {'p50 ms':>7} "
              f"{'p95 ms':>7} {'errors':>6} {'batch':>6}")
    print(header)
    print("-" * len(header))
    for label, r in rows:
        print(f"{label:<12} {r['concurrency']:>7} {r['rps']:>8.1f} {r['faces_per_s']:>8.1f} "
              f"{r['p50_ms']:>7.1f} {r['p95_ms']:>7.1f} {r['errors']:>6} "
              f"{r['mean_batch']:>6.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--concurrency", default="1,8",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--seconds", type=float, default=10.0, help="per way and client count")
    parser.add_argument("--faces", default=str(DEFAULT_FACES), help="folder of 48x48 PNG faces")
    parser.add_argument("--json", action="store_true", help="also JSON tensors at batch 32")
    parser.add_argument("--spawn", action="store_true", help="start a server on --store first")
    parser.add_argument("--store", default=str(ROOT / "model_store"))
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--env", action="append", default=[], metavar="FER_X=VALUE",
                        help="settings for the spawned server")
    args = parser.parse_args(argv)
    server = None
    if args.spawn:
        env = {"FER_LOG_LEVEL": "WARNING", **dict(pair.split("=", 1) for pair in args.env)}
        server = spawn_server(Path(args.store), args.port, env)
        args.url = f"http://127.0.0.1:{args.port}"
    try:
        rows = asyncio.run(main_async(args))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=20)
    print(f"# model {args.model}, {len(load_faces(Path(args.faces)))} faces, {args.seconds:g}s "
          f"per row, {cores()} cores, server {args.url}")
    print_table(rows)


if __name__ == "__main__":
    main()
