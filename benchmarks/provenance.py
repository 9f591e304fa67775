"""What every benchmark result records about where it came from (imported by the benchmark scripts, which run as
``python benchmarks/NAME.py`` and so find this module beside them)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The short commit of the checkout, with ``+dirty`` when tracked files differ from it; where the tree is a copy
    without its git folder (a lent machine), what ``MEGAEDGE_COMMIT`` says."""
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


def command(placeholders: dict | None = None, argv: list[str] | None = None) -> str:
    """The command line as a shell takes it back (quoted), with paths of this machine replaced by the names the
    docs use (``{work_dir: "DIR"}``): a result file names no machine's paths. A word is replaced when it is such a
    path, ends in ``=PATH`` (``--bundle name=PATH``) or lies under one."""
    names = {os.path.normpath(str(path)): name for path, name in (placeholders or {}).items()}

    def replaced(word: str) -> str:
        head, eq, tail = word.rpartition("=")
        value = tail if eq else word
        for path, name in names.items():
            norm = os.path.normpath(value)
            if norm == path or norm.startswith(path + os.sep):
                return head + eq + name + norm[len(path):]
        return word

    return "python " + shlex.join(replaced(w) for w in (sys.argv if argv is None else argv))
