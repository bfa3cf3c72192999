"""End-to-end accuracy on labelled photos through the serving code: `python -m bench.accuracy`.

Each photo goes through the service's own `Pipeline.prepare` (bounded decode, the
configured detector, crop or alignment, normalisation: exactly what `POST /predict` runs)
and each member model of the ensemble (`OnnxModel.infer`, with the card's TTA and
temperature); only the dynamic batcher is left out, which does not change a result. The
largest face is the answer; no face found counts as wrong. Per configuration it prints,
for `cnn10`, `resnet` and their `ensemble` (the latest versions in the store): right /
photos, accuracy end to end, accuracy on the photos with a face found.

Configurations: each `--config` is a comma list of settings (`FER_DETECTOR=retinaface`,
`FER_DETECT_MAX_SIDE=200`, ...) plus `align=0|1|card`, which overrides the cards'
`face_crop.align` (default `card`: as the committed cards say). For example:

    python -m bench.accuracy --config FER_DETECTOR=haar \\
        --config FER_DETECTOR=retinaface,align=0 --config FER_DETECTOR=retinaface,align=1

Default photos: ../shared/data/natural-dev and, when present, its 1280x720 frames
(.cache/dev-frames, from `python -m bench.photos --source ../shared/data/natural-dev
--frames 1280x720 --out .cache/dev-frames`). Speed is `bench.fer_compare`'s and
`bench.detectors`' job, not this one's.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2
import numpy as np

from bench.fer_compare import labelled_photos
from bench.stores import resolve_store

ROOT = Path(__file__).resolve().parent.parent
NATURAL_DEV = ROOT.parent / "shared" / "data" / "natural-dev"
DEV_FRAMES = ROOT / ".cache" / "dev-frames"


def parse_config(text: str) -> tuple[dict[str, str], str]:
    env, align = {}, "card"
    for pair in filter(None, text.split(",")):
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--config expects NAME=VALUE pairs, got {pair!r}")
        if name == "align":
            if value not in ("0", "1", "card"):
                raise SystemExit(f"align must be 0, 1 or card, got {value!r}")
            align = value
        elif name.startswith("FER_"):
            from service.settings import Settings

            if name.removeprefix("FER_").lower() not in Settings.model_fields:
                raise SystemExit(f"{name} is not a setting (service/settings.py)")
            env[name] = value
        else:
            raise SystemExit(f"unknown --config entry {name!r} (FER_* settings or align)")
    return env, align


def evaluate(env: dict[str, str], align: str, store: Path,
             photo_sets: list[Path]) -> dict[Path, dict[str, tuple[int, int, int]]]:
    """{set: {model: (right, found, photos)}} for one configuration."""
    from service.card import CLASSES
    from service.runtime import Runtime
    from service.settings import Settings

    names = {"FER_MODEL_STORE": str(store), "FER_RELOAD_INTERVAL_S": "0", **env}
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(names)
    try:
        settings = Settings()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    runtime = Runtime(settings)
    try:
        runtime.store.sync()
        target = runtime.store.resolve("ensemble")
        for model in target.members:
            if align != "card":
                crop = model.card.face_crop.model_copy(update={"align": align == "1"})
                model.card = model.card.model_copy(update={"face_crop": crop})
        out = {}
        for folder in photo_sets:
            labelled = labelled_photos(folder)
            names_ = [m.name for m in target.members]
            right = dict.fromkeys([*names_, "ensemble"], 0)
            found = 0
            for path, label in labelled:
                prepared = runtime.pipeline.prepare(path.read_bytes(), target, detect=True)
                if not prepared.boxes:
                    continue
                found += 1
                member = [model.infer(inputs[:1])[0]
                          for model, inputs in zip(target.members, prepared.inputs, strict=True)]
                for name, probabilities in (*zip(names_, member, strict=True),
                                            ("ensemble", np.mean(member, axis=0))):
                    right[name] += CLASSES[int(np.argmax(probabilities))] == label
            out[folder] = {name: (count, found, len(labelled)) for name, count in right.items()}
        return out
    finally:
        runtime.pipeline.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=None, metavar="FER_X=V,align=1")
    parser.add_argument("--photos", type=Path, action="append", default=None)
    parser.add_argument("--store", type=Path, default=None,
                        help="default: model_store/ (the committed models)")
    args = parser.parse_args(argv)
    sets = args.photos or [s for s in (NATURAL_DEV, DEV_FRAMES) if s.is_dir()]
    if not sets:
        raise SystemExit(f"no photos: give --photos (default {NATURAL_DEV}, {DEV_FRAMES})")
    store = resolve_store(args.store)
    cv2.setNumThreads(1)
    print(f"# store {store}; right / photos, end to end (no face found = wrong); "
          "in brackets: accuracy on the photos with a face found")
    for text in args.config or [""]:
        env, align = parse_config(text)
        results = evaluate(env, align, store, sets)
        for folder, by_model in results.items():
            found, total = next(iter(by_model.values()))[1:]
            cells = "  ".join(f"{name} {right:>3}/{total} = {right / total:.3f} "
                              f"({right / max(found, 1):.3f})"
                              for name, (right, _, _) in by_model.items())
            print(f"{text or 'defaults':<44} {folder.name:<12} found {found:>3}/{total}  {cells}",
                  flush=True)


if __name__ == "__main__":
    main()
