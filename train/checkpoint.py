"""`fit` checkpoints on disk: the one reader (for --resume, --init-from and `snapshot`) and an
atomic writer, so a run killed mid-save still has its previous checkpoint."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch


def read_checkpoint(path: str | Path, label: str) -> dict[str, Any]:
    """A `fit` checkpoint (or snapshot) from disk; anything else is a ValueError naming
    `label`, the option or command that asked for it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{label}: not a training checkpoint ({error})") from None
    if not isinstance(checkpoint, dict) or not {"model", "epoch", "config"} <= checkpoint.keys():
        raise ValueError(f"{label}: not a training checkpoint (no weights, epoch or recipe)")
    return checkpoint


def write_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)
