"""Progress bars and logging setup shared by long-running commands (export, calibration, eval)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_ENV_DISABLE = "MEGAEDGE_NO_PROGRESS"


def progress_enabled() -> bool:
    return os.environ.get(_ENV_DISABLE, "") in ("", "0") and sys.stderr.isatty()


def set_progress(enabled: bool) -> None:
    """Switch progress bars on or off for this process (``--no-progress`` sets it off)."""
    os.environ[_ENV_DISABLE] = "0" if enabled else "1"


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a tqdm bar on a terminal; plain iteration when disabled or piped."""
    if not progress_enabled():
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


def setup_logging(verbosity: int = 0) -> None:
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megaedge").setLevel(max(level, logging.DEBUG))
