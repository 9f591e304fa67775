"""What every benchmark result records about where it came from (imported by the benchmark scripts, which run as
``python benchmarks/NAME.py`` and so find this module beside them)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The short commit of the checkout, with ``+dirty`` when tracked files differ from it; where the tree is a copy
    without its git folder (a lent machine), what ``MEGAEDGE_COMMIT`` says."""
    import os

    if os.environ.get("MEGAEDGE_COMMIT"):
        return os.environ["MEGAEDGE_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
