"""`python -m train pack`: FER2013's splits in one compact file (`*.npz.xz`), e.g. to carry
the data to a GPU machine that cannot reach it (train/device/README.md)."""

from __future__ import annotations

import argparse

from train.data import pack_splits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="../shared/data/fer2013",
                        help="FER2013 folder root or fer2013.csv")
    parser.add_argument("--out", required=True, help="the packed file, ending in .npz.xz")
    parser.add_argument("--splits", default="train,validation",
                        help="comma-separated splits to pack (train, validation, test)")


def main(args: argparse.Namespace) -> None:
    out = pack_splits(args.data, args.out, tuple(s for s in args.splits.split(",") if s))
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB")  # noqa: T201
