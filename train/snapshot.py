"""`python -m train snapshot`: a run's last.pt in the compact form a commit can carry, so a
long schedule survives the loss of its machine (`runs/` is not in git).

The snapshot keeps everything `fit --resume` needs to go on with the same schedule (epoch
counter, wall time spent, history, best figures, recipe) and the weights in float16; it
drops the optimiser's state, so SGD's momentum restarts from zero on resume (it rebuilds
within a few dozen steps). A cnn10 snapshot is about a quarter of last.pt.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from train.checkpoint import read_checkpoint, write_checkpoint

SNAPSHOT_DTYPE = torch.float16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="the run whose last.pt is snapshotted")
    parser.add_argument("--out", required=True,
                        help="the snapshot file, e.g. train/snapshots/<run>.pt; continue with "
                             "fit --resume <snapshot> --run-dir <new folder>")


def compact(checkpoint: dict[str, Any], source: str) -> dict[str, Any]:
    """The checkpoint with float16 weights and no optimiser state."""
    weights = {name: tensor.to(SNAPSHOT_DTYPE) if tensor.is_floating_point() else tensor
               for name, tensor in checkpoint["model"].items()}
    return {**checkpoint, "model": weights, "optimizer": None,
            "snapshot": {"of": source, "epoch": checkpoint["epoch"],
                         "weights": str(SNAPSHOT_DTYPE).removeprefix("torch."),
                         "optimizer": "dropped: momentum restarts on resume"}}


def write_snapshot(run_dir: str | Path, out: str | Path) -> Path:
    last = Path(run_dir) / "last.pt"
    if not last.exists():
        raise FileNotFoundError(f"nothing to snapshot: {last} does not exist")
    checkpoint = read_checkpoint(last, f"snapshot of {last}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(compact(checkpoint, str(last)), out)
    return out


def main(args: argparse.Namespace) -> None:
    out = write_snapshot(args.run_dir, args.out)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB")  # noqa: T201
