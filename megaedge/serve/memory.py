"""glibc allocator settings for a long-running server, and returning freed memory to the system when idle.

A server's live heap stays flat under steady load, yet glibc's defaults let its RSS climb for tens of minutes:

* one malloc arena per thread that ever allocated (up to 8 per core): the worker pool, onnxruntime's and
  asyncio's threads each fragment an arena of their own, and memory freed in one arena is not reused by another;
* the dynamic mmap threshold: after a large block (a KV cache, a tensor of a new shape) is freed, glibc raises
  the threshold to its size, so later blocks that size come from an arena instead of mmap and, once freed, stay
  resident as fragments between live small blocks.

``tune()`` sets two arenas and a fixed 256 KiB mmap threshold (large blocks go back to the system when freed),
unless the environment already sets them (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_); ``trim()`` hands free heap
pages back (malloc_trim) and is called when the server goes idle. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger("megaedge.serve")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
ARENAS = 2
MMAP_THRESHOLD = 256 * 1024
TRIM_THRESHOLD = 1024 * 1024  # glibc's default is 128 KiB; with the threshold fixed it no longer rises itself


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        name = ctypes.util.find_library("c") or "libc.so.6"
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def tune() -> dict:
    """Call before the server starts its threads; returns what was set (for the log and /health)."""
    libc = _libc()
    if libc is None:
        return {}
    done = {}
    if "MALLOC_ARENA_MAX" not in os.environ and libc.mallopt(M_ARENA_MAX, ARENAS) == 1:
        done["arena_max"] = ARENAS
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1:
        done["mmap_threshold"] = MMAP_THRESHOLD
        if "MALLOC_TRIM_THRESHOLD_" not in os.environ and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
            done["trim_threshold"] = TRIM_THRESHOLD
    log.debug("malloc settings: %s", done)
    return done


def trim() -> bool:
    """Return free heap memory to the system (glibc's malloc_trim); False where there is no such call."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
