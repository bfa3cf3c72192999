"""Model stores for the benchmarks: the committed one when it has models, else a stand-in.

The stand-in holds untrained networks of the real sizes (CNN10, and the improved ResNet at
width 16, blocks [2, 2, 2, 2]) exported the way `train export` does, so inference costs
what it will with trained weights; only the predictions are meaningless.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMMITTED_STORE = ROOT / "model_store"
STAND_IN_STORE = ROOT / ".cache" / "bench-store"

# The architectures the trained models use (train/models defaults unless listed).
REAL_OPTIONS: dict[str, dict[str, Any]] = {
    "cnn10": {},
    "resnet": {"width": 16, "blocks": [2, 2, 2, 2]},
}


def latest_versions(store: Path) -> dict[str, Path]:
    """{model name: folder of its highest numeric version} for every model in `store`."""
    found: dict[str, Path] = {}
    if not store.is_dir():
        return found
    for model in sorted(p for p in store.iterdir() if p.is_dir()):
        versions = [p for p in model.iterdir()
                    if p.is_dir() and re.fullmatch(r"[1-9][0-9]*", p.name)
                    and (p / "model.onnx").is_file() and (p / "model.json").is_file()]
        if versions:
            found[model.name] = max(versions, key=lambda p: int(p.name))
    return found


def build_stand_in(store: Path = STAND_IN_STORE) -> Path:
    """Export untrained cnn10 and resnet (real sizes) into `store`, once."""
    if set(REAL_OPTIONS) <= set(latest_versions(store)):
        return store
    import numpy as np
    import torch

    from service.card import InputSpec
    from train import models
    from train.export import architecture_summary, write_version

    torch.manual_seed(0)
    faces = np.random.default_rng(0).integers(0, 256, (4, 48, 48), dtype=np.uint8)
    have = latest_versions(store)
    for name, options in REAL_OPTIONS.items():
        if name in have:
            continue
        model = models.build(name, **options)
        write_version(
            model, name, store, InputSpec(mean=0.5, std=0.25),
            architecture_summary(name, models.config_dict(name, **options)), parity_faces=faces,
            metrics={"note": "untrained stand-in for benchmarks"},
            training={"recipe": {"model_options": options}},
        )
    return store


def resolve_store(store: Path | None) -> Path:
    """`store` if given; else the committed store if it has cnn10 and resnet; else the stand-in."""
    if store is not None:
        return store
    if set(REAL_OPTIONS) <= set(latest_versions(COMMITTED_STORE)):
        return COMMITTED_STORE
    return build_stand_in()
