"""The native kernel builds a test can run here: what the runtime loads (a prebuilt variant of the package, or this
machine's build), and the other builds it can also execute."""

from __future__ import annotations

import pytest

from megaedge.runtime import kernels

try:
    KERNELS = kernels.load()
    WHY_NOT = ""
except RuntimeError as exc:  # no prebuilt library for this CPU and no C compiler: onnxruntime runs, as the runtime does
    KERNELS, WHY_NOT = None, f"native kernel not buildable here: {exc}"
needs_kernel = pytest.mark.skipif(KERNELS is None, reason=WHY_NOT or "kernel available")


def _variants() -> list:
    """This machine's build, the portable C build (what CPUs without a tuned path run), on an AVX512 CPU the AVX2
    build (what CPUs without AVX512 run) and on an AMX CPU the AVX512-VNNI build, when they build."""
    found = [pytest.param(KERNELS, id=KERNELS.isa)] if KERNELS is not None else []
    seen = {KERNELS.isa} if KERNELS is not None else set()
    for variant in ("portable", "avx2", "vnni"):
        try:
            built = kernels.Q8Kernels(kernels.build(variant=variant))
        except (RuntimeError, OSError):
            continue
        if built.isa not in seen:
            seen.add(built.isa)
            found.append(pytest.param(built, id=built.isa))
    return found


VARIANTS = _variants()
