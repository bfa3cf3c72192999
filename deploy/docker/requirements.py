"""Print the requirements of pyproject.toml (dependencies plus the named extras), one a line.

The Dockerfile installs these in a layer of their own, before the source is copied, so a
code change rebuilds only the small layer that installs the package itself:

    python deploy/docker/requirements.py cpu > /tmp/requirements.txt
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    lines = list(project["dependencies"])
    for extra in extras:
        lines += optional[extra]
    return lines


def main(argv: list[str]) -> int:
    pyproject = Path("pyproject.toml")
    print("\n".join(requirements(pyproject, argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
