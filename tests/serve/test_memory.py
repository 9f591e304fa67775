"""serve/memory.py: glibc's allocator tuned for a long-running server (unless the environment says otherwise), and
freed heap handed back to the system when the server goes idle. Each case runs in a child process: mallopt
settings last for the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megaedge.serve import memory

needs_glibc = pytest.mark.skipif(memory._libc() is None or not sys.platform.startswith("linux"),
                                 reason="glibc's mallopt / malloc_trim")

CHILD = """
import json, sys
import numpy as np
from megaedge.serve import memory

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

done = memory.tune()
blocks = [np.ones(200 * 1024 // 8) for _ in range(2000)]  # 200 KiB each: under the fixed mmap threshold, heap
keep = blocks[-1:]  # one live block at the top of the heap: free pages below it stay unless trimmed
del blocks
before = rss_mib()
trimmed = memory.trim()
print(json.dumps({"done": done, "before": before, "after": rss_mib(), "trimmed": trimmed}))
"""


def _child(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env})
    return json.loads(out.stdout)


@needs_glibc
def test_tune_sets_arenas_and_a_fixed_mmap_threshold_and_trim_returns_freed_heap():
    got = _child({})
    assert got["done"] == {"arena_max": memory.ARENAS, "mmap_threshold": memory.MMAP_THRESHOLD,
                           "trim_threshold": memory.TRIM_THRESHOLD}
    assert got["trimmed"] and got["before"] - got["after"] > 200, got  # ~400 MiB freed, most of it handed back


@needs_glibc
def test_the_environment_s_malloc_settings_win():
    got = _child({"MALLOC_ARENA_MAX": "4", "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert got["done"] == {}
