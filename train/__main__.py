"""Command line: `python -m train <command> ...`; the commands: fit, evaluate, export,
feature-maps, calibrate, quantize, compare, soup, pack, teach, snapshot."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from dataclasses import asdict, fields
from typing import Any

from service.onnx_model import ModelLoadError
from train.augment import AugmentConfig
from train.data import DatasetError
from train.fit import OPTION_HELP, FitConfig

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter


def parse_value(text: str) -> Any:
    """`key=value` values: JSON where it parses (numbers, true, [2,2]), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {pair!r}")
        options[key.replace("-", "_")] = parse_value(value)
    return options


def add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="train a network on FER2013", formatter_class=HELP_FORMAT)
    defaults = FitConfig()
    for f in fields(FitConfig):
        if f.name in ("model_options", "augment"):
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value,
                           metavar="BOOL", help=OPTION_HELP[f.name])
        else:
            p.add_argument(flag, type=type(value), default=value, help=OPTION_HELP[f.name])
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="network option, e.g. --opt batch_norm=true (cnn10), --opt width=16 "
                        "--opt blocks=[2,2,2,2] (resnet, resnet-plain)")
    p.add_argument("--aug", action="append", default=[], metavar="KEY=VALUE",
                   help="augmentation option, e.g. --aug crop=40 --aug erase_p=0.5; options and "
                        f"defaults: {asdict(AugmentConfig())}")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="SNAPSHOT",
                   help="continue the run in --run-dir from its last.pt, or, given a file, from "
                        "that checkpoint or `train snapshot` in a new --run-dir, with the run's "
                        "own settings (only --epochs, --early-stop-patience, --time-budget, "
                        "--threads, --keep-epochs and the --data path, not the data itself, may "
                        "be changed, by naming them)")


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="accuracy of an exported model (ONNX) on a split or photos",
                       formatter_class=HELP_FORMAT)
    p.add_argument("--model", required=True,
                   help="model_store/<name>/<version> folder; comma-separate several for the "
                        "ensemble")
    p.add_argument("--data", help="FER2013 folder root or fer2013.csv")
    p.add_argument("--split", default="validation", choices=["train", "validation", "test"],
                   help="FER2013 split to score (test = PrivateTest, only where the data has it)")
    p.add_argument("--photos", help="folder of natural photos, <folder>/<class>/*.jpg")
    p.add_argument("--tta", default="card",
                   help="test-time augmentation: card (as the card says), none, or a comma list "
                        "of hflip, five_crop (both = ten crops plus the whole face and its mirror)")
    p.add_argument("--mirror", action="store_true",
                   help="also score every face of the --data split and its mirror image apart "
                        "(no TTA), the two averaged, and their top-1 agreement")
    p.add_argument("--subsets", action="store_true",
                   help="with three or more comma-separated --model folders, also score every "
                        "ensemble of two or more of them on the --data split, best first (the "
                        "best is chosen on that split, so it is optimistic)")
    p.add_argument("--out", default=None, help="folder for metrics JSON and confusion PNG")


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="ONNX + model card into the model store",
                       formatter_class=HELP_FORMAT)
    p.add_argument("--checkpoint", required=True, help="a run's best.pt")
    p.add_argument("--name", default=None,
                   help="model name in the store; none = the network's name")
    p.add_argument("--store", default="model_store",
                   help="model store folder; the version is the next free number under it")
    p.add_argument("--tta", default="", help="comma-separated TTA the service applies, e.g. hflip")
    p.add_argument("--padding", type=float, default=None, help="face crop padding for the card")
    p.add_argument("--equalize", action="store_true", help="histogram-equalise face crops")
    p.add_argument("--photos", help="labelled natural photos, <folder>/<class>/*.jpg (comma-"
                   "separate several sets): end-to-end accuracy in the card")
    p.add_argument("--note", default="", help="free text for the card's training section")
    p.add_argument("--data", default=None,
                   help="FER2013 for the card's figures; none = the run's --data")


def add_feature_maps(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("feature-maps", help="PNG grid of every conv layer's feature maps",
                       formatter_class=HELP_FORMAT)
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                   help="a run's best.pt (the checkpoint has the layers the ONNX graph fuses)")
    p.add_argument("--image", required=True, help="a face photo (detected) or a 48x48 face")
    p.add_argument("--out", default="feature_maps.png", help="PNG file the grid is written to")
    p.add_argument("--maps", type=int, default=16, help="feature maps shown per layer")


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", formatter_class=HELP_FORMAT,
                       help="fit an exported version's temperature on validation, into its card")
    p.add_argument("--model", required=True,
                   help="model_store/<name>/<version> folder; comma-separate several to fit the "
                        "ensemble's own temperature into <store>/ensemble.json")
    p.add_argument("--data", default="../shared/data/fer2013",
                   help="FER2013 folder root or fer2013.csv (its validation split is used)")
    p.add_argument("--dry-run", action="store_true", help="print the report, leave the card")


def add_quantize(sub: argparse._SubParsersAction) -> None:
    from train.quantize import add_arguments

    p = sub.add_parser("quantize", formatter_class=HELP_FORMAT,
                       help="int8 static quantization of an exported version, kept beside "
                            "model.onnx only within the accuracy and agreement budget; the "
                            "result into its card")
    add_arguments(p)


def add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="A/B: runs' best checkpoints on validation, 1 pass and "
                       "hflip, clean accuracy, ECE before/after T", formatter_class=HELP_FORMAT)
    p.add_argument("--run", action="append", required=True,
                   help="a run folder (its best.pt) or a checkpoint; repeat for each arm")
    p.add_argument("--data", required=True, help="FER2013 folder root or fer2013.csv")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = all cores")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")


def add_soup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soup", help="average the weights of runs fine-tuned from one parent "
                       "into one network (uniform or greedy soup)", formatter_class=HELP_FORMAT)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a run folder (its best.pt), a checkpoint, or an exported version "
                        "(model_store/<name>/<version>, not first); repeat for each ingredient")
    p.add_argument("--data", required=True, help="FER2013 folder root or fer2013.csv")
    p.add_argument("--out", required=True, help="folder for the soup's best.pt (then train export)")
    p.add_argument("--greedy", action="store_true",
                   help="keep an ingredient only if it does not lower clean validation accuracy")
    p.add_argument("--select-tta", default="hflip", choices=["none", "hflip"],
                   help="the validation accuracy greedy selection compares (hflip for models "
                        "served with it)")
    p.add_argument("--bn-batches", type=int, default=100,
                   help="batches of 128 training faces that measure BatchNorm's statistics again")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = all cores")


def add_pack(sub: argparse._SubParsersAction) -> None:
    from train.pack import add_arguments

    p = sub.add_parser("pack", formatter_class=HELP_FORMAT,
                       help="FER2013's splits in one compact file (.npz.xz) that --data accepts")
    add_arguments(p)


def add_teach(sub: argparse._SubParsersAction) -> None:
    from train.distill import add_arguments

    p = sub.add_parser("teach", formatter_class=HELP_FORMAT,
                       help="exported models' probabilities on the training faces, for "
                            "fit --teacher (knowledge distillation)")
    add_arguments(p)


def add_snapshot(sub: argparse._SubParsersAction) -> None:
    from train.snapshot import add_arguments

    p = sub.add_parser("snapshot", formatter_class=HELP_FORMAT,
                       help="a run's last.pt in compact form (float16 weights, no optimiser "
                            "state) to commit, so a long run survives the loss of its machine")
    add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_fit(sub)
    add_evaluate(sub)
    add_export(sub)
    add_feature_maps(sub)
    add_calibrate(sub)
    add_quantize(sub)
    add_compare(sub)
    add_soup(sub)
    add_pack(sub)
    add_teach(sub)
    add_snapshot(sub)
    return parser


def options_given(argv: list[str]) -> set[str]:
    """The options this command line names, as opposed to those left at their defaults."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in commands.choices.values():
        for action in command._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        run(args, options_given(argv))
    except (DatasetError, ModelLoadError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"python -m train {args.command}: {error}", file=sys.stderr)  # noqa: T201
        return 2
    return 0


COMMAND_MODULES = {
    "evaluate": "train.evaluate", "export": "train.export", "calibrate": "train.calibrate",
    "quantize": "train.quantize", "soup": "train.soup", "compare": "train.compare",
    "feature-maps": "train.feature_maps", "pack": "train.pack", "teach": "train.distill",
    "snapshot": "train.snapshot",
}


def run(args: argparse.Namespace, given: set[str] | None = None) -> None:
    if args.command == "fit":
        from train.fit import fit

        values = {f.name: getattr(args, f.name) for f in fields(FitConfig)
                  if f.name not in ("model_options", "augment")}
        config = FitConfig(**values, model_options=parse_options(args.opt),
                           augment=parse_options(args.aug))
        result = fit(config, resume=args.resume, given=given)
        print(json.dumps(result))
    else:
        # Imported only when run: each command pulls in its own heavy dependencies.
        importlib.import_module(COMMAND_MODULES[args.command]).main(args)


if __name__ == "__main__":
    raise SystemExit(main())
