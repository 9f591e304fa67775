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
    """megaedge's own messages from WARNING (INFO with -v, DEBUG with -vv). Other libraries' warnings (onnxruntime's
    quantizer notes, deprecation warnings of torch and transformers) are not the user's to act on: they show only
    with -v; their errors always show."""
    import warnings

    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megaedge").setLevel(max(level, logging.DEBUG))
    if verbosity > 0:
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(_own_or_error)
    # torch's loggers print through torch's own handler, which the filter above never sees (the ONNX exporter's
    # "torchvision is not installed" notes); torch reads its levels from TORCH_LOGS when it is imported, which the
    # CLI does after this. A user's own TORCH_LOGS wins.
    os.environ.setdefault("TORCH_LOGS", "-onnx")
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger, which the filter then holds back
    warnings.simplefilter("default")


def _own_or_error(record: logging.LogRecord) -> bool:
    return record.name == "megaedge" or record.name.startswith("megaedge.") or record.levelno >= logging.ERROR
