"""Which code produced an artefact: the commit every card and checkpoint records."""

from __future__ import annotations

import os
import subprocess


def git_commit() -> str:
    """The code's commit (`-dirty` with changes to train/ or service/); FER_TRAIN_COMMIT where
    the copy has no git history (a GPU machine is sent the tree without .git)."""
    if os.environ.get("FER_TRAIN_COMMIT"):
        return os.environ["FER_TRAIN_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "train", "service"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
