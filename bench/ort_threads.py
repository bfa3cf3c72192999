"""ONNX Runtime threading on the CPU: `python -m bench.ort_threads` -> faces/s and latency.

Issue 12 asks whether one intra-op thread per session, with one session per core, beats
one session with intra-op threads at the batch sizes that really occur (mean batch ~1 on
single-face photos). Each layout runs the committed models (session options as the
service's: no spinning, full graph optimisation, the card's TTA) for `--seconds`, with
one caller thread per session, all calling at once:

* `1 session x 2 threads`: the service today (one batcher thread per model, intra-op =
  cores);
* `2 sessions x 1 thread`: one session per core, each with its own caller;
* `1 session x 1 thread`: the single-core reference.

`--ensemble` runs the ensemble's members side by side instead (each with its own caller,
as the service's batchers do), with intra-op threads = cores or 1.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.models import cores
from bench.stores import latest_versions, resolve_store
from service.onnx_model import OnnxModel


@dataclass
class Result:
    layout: str
    batch: int
    faces_per_s: float
    p50_ms: float
    p99_ms: float


def run_together(models: list[OnnxModel], batch: int, seconds: float) -> tuple[float, list[float]]:
    """Every model called in a loop by its own thread, all at once: (faces/s, latencies s)."""
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal((batch, 1, m.input_size, m.input_size), dtype=np.float32)
             for m in models]
    for model, feed in zip(models, feeds, strict=True):
        model.infer(feed)  # warm: first runs allocate
    latencies: list[list[float]] = [[] for _ in models]
    start = threading.Barrier(len(models) + 1)
    deadline = [0.0]

    def loop(index: int) -> None:
        start.wait()
        model, feed, times = models[index], feeds[index], latencies[index]
        while (now := time.perf_counter()) < deadline[0]:
            model.infer(feed)
            times.append(time.perf_counter() - now)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(models))]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    # The ensemble answers a face when every member has: count faces per member pass.
    calls = min(len(times) for times in latencies)
    return calls * batch / elapsed, [t for times in latencies for t in times]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


def measure(layout: str, models: list[OnnxModel], batch: int, seconds: float,
            repeats: int) -> Result:
    rates, latencies = [], []
    for _ in range(repeats):
        rate, times = run_together(models, batch, seconds)
        rates.append(rate)
        latencies.extend(times)
    return Result(layout, batch, statistics.median(rates), 1000 * percentile(latencies, 50),
                  1000 * percentile(latencies, 99))


def layouts(folder: Path, n_cores: int) -> dict[str, list[OnnxModel]]:
    load = lambda threads: OnnxModel(folder, ["CPUExecutionProvider"], threads)  # noqa: E731
    return {
        f"1 session x {n_cores} threads": [load(n_cores)],
        f"{n_cores} sessions x 1 thread": [load(1) for _ in range(n_cores)],
        "1 session x 1 thread": [load(1)],
    }


def ensemble_layouts(folders: list[Path], n_cores: int) -> dict[str, list[OnnxModel]]:
    load = lambda folder, threads: OnnxModel(folder, ["CPUExecutionProvider"], threads)  # noqa: E731
    return {f"members x {threads} threads": [load(f, threads) for f in folders]
            for threads in (n_cores, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=None,
                        help="model store (default: model_store/ if it has cnn10 and resnet)")
    parser.add_argument("--models", default="cnn10,resnet", help="comma-separated model names")
    parser.add_argument("--batches", default="1,2,4,8",
                        type=lambda s: [int(x) for x in s.split(",")],
                        help="faces per call (default: 1,2,4,8)")
    parser.add_argument("--seconds", type=float, default=1.0, help="per round (default: 1.0)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per layout (default: 3)")
    parser.add_argument("--ensemble", action="store_true",
                        help="run the --models side by side, as the ensemble does")
    args = parser.parse_args(argv)

    n_cores = cores()
    folders = latest_versions(resolve_store(args.store))
    names = [n for n in args.models.split(",") if n in folders]
    print(f"# {n_cores} cores usable; models {', '.join(str(folders[n]) for n in names)}; "
          "faces/s counts faces answered by every model of a row (TTA included)")
    groups = ({"+".join(names): ensemble_layouts([folders[n] for n in names], n_cores)}
              if args.ensemble else {n: layouts(folders[n], n_cores) for n in names})
    header = f"{'model':<14} {'layout':<24} {'batch':>5} {'faces/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
    print(header)
    print("-" * len(header))
    for name, group in groups.items():
        for batch in args.batches:
            for layout, models in group.items():
                r = measure(layout, models, batch, args.seconds, args.repeats)
                # Sessions of one model side by side each answer their own faces.
                rate = r.faces_per_s * (len(models) if not args.ensemble else 1)
                print(f"{name:<14} {r.layout:<24} {r.batch:>5} {rate:>9.0f} "
                      f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
