"""Model-only speed: `python -m bench.models` -> faces/s per model and batch size.

Times each model's forward pass alone (no detection, no HTTP) in ONNX Runtime (CPU
execution provider, configured exactly as the service configures it) and in PyTorch
eager (`torch.no_grad`, same thread count). The ONNX models come from the store (the
committed one when it has cnn10 and resnet, else an untrained stand-in of the real
sizes); the PyTorch module is rebuilt from the same architecture (the card's
`training.recipe.model_options`), or loaded from `--checkpoint name=PATH`. Weights do
not change the speed. Neither engine's idle threads spin (ORT: the service's
`allow_spinning=0`; torch: OMP_WAIT_POLICY=PASSIVE unless `--omp-wait active`): on a
machine shared with other work, spinning threads wreck both. The two engines are timed
in alternating rounds and the median round is reported, so a busy machine slows both
alike.

Where a version has an int8 graph (`model.int8.onnx`, `python -m train quantize`), it is
timed too, in the same rounds and with the same session options: the int8 column is what
FER_INT8=auto serves. Batches count graph rows: cnn10's card adds a mirror image per face
(hflip TTA), so a served batch of n faces is a graph batch of 2n.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from bench.stores import REAL_OPTIONS, latest_versions, resolve_store
from service.card import INT8_FILENAME


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torch_module(name: str, folder: Path, checkpoint: Path | None):
    import torch  # noqa: F401  (train.models needs it)

    from train import models

    if checkpoint is not None:
        from train.export import load_checkpoint

        model, _ = load_checkpoint(checkpoint)
        return model.eval(), f"checkpoint {checkpoint}"
    card = json.loads((folder / "model.json").read_text())
    options = card.get("training", {}).get("recipe", {}).get("model_options")
    source = "card model_options"
    if options is None:
        options, source = REAL_OPTIONS.get(name, {}), "default options (card has none)"
    model = models.build(name, **options).eval()
    expected = card.get("training", {}).get("parameters")
    if expected is not None and expected != models.parameter_count(model):
        source += f" (WARNING: {models.parameter_count(model)} parameters, card says {expected})"
    return model, source


def run_torch(module, batch) -> None:
    import torch

    with torch.no_grad():
        module(batch)


def rounds(runners: dict[str, Callable[[], None]], batch: int, seconds: float,
           repeats: int) -> dict[str, float]:
    """Median faces/s of each runner over `repeats` alternating rounds of ~`seconds`."""
    rates: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(repeats):
        for key, run in runners.items():
            run()  # one untimed call so each round starts warm
            calls, started = 0, time.perf_counter()
            while True:
                run()
                calls += 1
                elapsed = time.perf_counter() - started
                if elapsed >= seconds:
                    break
            rates[key].append(calls * batch / elapsed)
    return {key: statistics.median(values) for key, values in rates.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=None,
                        help="model store (default: model_store/ if it has cnn10 and resnet, "
                             "else an untrained stand-in in .cache/bench-store)")
    parser.add_argument("--models", default="cnn10,resnet")
    parser.add_argument("--batches", default="1,2,4,8,64",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--threads", type=int, default=0, help="0 = the cores this process may use")
    parser.add_argument("--seconds", type=float, default=0.5, help="per round")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per engine")
    parser.add_argument("--no-torch", dest="torch", action="store_false",
                        help="time ONNX Runtime alone (fp32, and int8 where there is a file)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="PyTorch weights for a model (else rebuilt untrained)")
    parser.add_argument("--omp-wait", choices=("passive", "active"), default="passive",
                        help="OMP_WAIT_POLICY for torch's OpenMP threads (read when torch "
                             "loads); passive matches the service's non-spinning ORT threads")
    args = parser.parse_args(argv)
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait.upper()

    import torch

    from service.onnx_model import OnnxModel

    threads = args.threads or cores()
    torch.set_num_threads(threads)
    store = resolve_store(args.store)
    checkpoints = {k: Path(v) for k, v in (pair.split("=", 1) for pair in args.checkpoint)}
    folders = latest_versions(store)
    rng = np.random.default_rng(0)
    print(f"# store {store}, {threads} threads (ONNX Runtime intra-op and torch), "
          f"{cores()} cores usable, onnxruntime CPU EP (session options as the service's) vs "
          f"torch {torch.__version__} eager (OMP_WAIT_POLICY={args.omp_wait})")
    rows = []
    for name in args.models.split(","):
        if name not in folders:
            print(f"# {name}: not in {store}, skipped")
            continue
        onnx_model = OnnxModel(folders[name], ["CPUExecutionProvider"], threads)
        session, input_name = onnx_model.session, onnx_model.input_name
        int8_session = None
        if (folders[name] / INT8_FILENAME).exists():
            int8_session = OnnxModel(folders[name], ["CPUExecutionProvider"], threads,
                                     precision="int8").session
        module, source = torch_module(name, folders[name], checkpoints.get(name)) \
            if args.torch else (None, "not timed")
        size = onnx_model.input_size
        print(f"# {name}: {folders[name]} (PyTorch from {source}; int8: "
              f"{INT8_FILENAME if int8_session else 'none'})")
        for batch in args.batches:
            x = rng.standard_normal((batch, 1, size, size), dtype=np.float32)
            runners = {"onnx": partial(session.run, None, {input_name: x})}
            if int8_session is not None:
                runners["int8"] = partial(int8_session.run, None, {input_name: x})
            if module is not None:
                runners["torch"] = partial(run_torch, module, torch.from_numpy(x))
            rates = rounds(runners, batch, args.seconds, args.repeats)
            rows.append((name, batch, rates["onnx"], rates.get("int8"), rates.get("torch")))
    header = f"{'model':<8} {'batch':>5} {'ORT faces/s':>12} {'int8 faces/s':>13} " \
             f"{'int8/fp32':>9} {'torch faces/s':>14} {'ORT/torch':>9} {'ORT ms/batch':>13} " \
             f"{'int8 ms/batch':>14}"
    print(header)
    print("-" * len(header))

    def shown(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for name, batch, ort_rate, int8_rate, torch_rate in rows:
        print(f"{name:<8} {batch:>5} {ort_rate:>12.0f} {shown(int8_rate, '.0f'):>13} "
              f"{shown(int8_rate and int8_rate / ort_rate, '.2f'):>9} "
              f"{shown(torch_rate, '.0f'):>14} "
              f"{shown(torch_rate and ort_rate / torch_rate, '.2f'):>9} "
              f"{1000 * batch / ort_rate:>13.2f} "
              f"{shown(int8_rate and 1000 * batch / int8_rate, '.2f'):>14}")


if __name__ == "__main__":
    main()
