"""Which INT8 recipe suits the CPU a bundle runs on, and a warning when the loaded bundle's does not.

A bundle is exported on a workstation and copied to a device: the recipe is chosen far from the CPU that will run
it. What separates the CPU classes is whether the CPU has int8 dot products (x86 VNNI / AMX, ARM dot product):
with them megaedge's native kernels run prompts and decode steps from one weight copy, and ``cpu-float-encoder``
(the export default, the recipe that keeps every acoustic condition within half a WER point of FP32) is the
choice; without them (AVX2 only, ARM without dot product) the native prompt is slow and onnxruntime's dynamic-int8
prefill graph of ``cpu-prefill`` is what keeps prompts fast, at a measured cost in accuracy. The evidence is in
docs/int8.md. This module names the recipe; it does not measure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("megaedge.runtime.recipe_advice")

# CPU classes, from the most to the least capable int8 arithmetic.
CPU_CLASSES = ("amx", "avx512-vnni", "avx-vnni", "avx2", "arm-dotprod", "arm", "portable")
_DOT_PRODUCT_CLASSES = {"amx", "avx512-vnni", "avx-vnni", "arm-dotprod"}

RECOMMENDED = {cls: ("cpu-float-encoder" if cls in _DOT_PRODUCT_CLASSES else "cpu-prefill") for cls in CPU_CLASSES}

# Recipes that cost accuracy on every CPU (docs/int8.md: the static W8A8 decoders and the per-tensor baseline are
# the worst in every measurement) and the reason given to the user.
_INACCURATE = {
    "naive": "per-tensor INT8, the accuracy baseline",
    "smoothquant": "static W8A8 decoder, the least accurate CPU recipe",
    "tensorrt": "made for TensorRT (static W8A8 decoder), less accurate and slow on a CPU",
}
# Recipes without a prefill graph: where the CPU lacks int8 dot products their prompts run in megaedge's portable
# kernel or onnxruntime's weight-only MatMul, several times slower than the dynamic-int8 prefill graph.
_NO_PREFILL_GRAPH = {"cpu", "cpu-int8-fc2", "cpu-accurate", "cpu-float-encoder", "cpu-fast", "cpu-dynamic"}


@dataclass(frozen=True)
class Advice:
    cpu_class: str
    recommended: str
    problem: str | None  # why the bundle's recipe does not suit this CPU; None when it does

    def warning(self, recipe: str) -> str:
        return (f"this bundle's INT8 recipe {recipe!r} is {self.problem} on this CPU ({self.cpu_class}); export "
                f"with --int8 --recipe {self.recommended} for it")


def cpu_class(flags: set[str], machine: str) -> str:
    """The CPU class of a machine from its /proc/cpuinfo flags and ``platform.machine()``."""
    machine = machine.lower()
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        return "arm-dotprod" if "asimddp" in flags else "arm"
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    if "avx2" in flags:
        return "avx2"
    return "portable"


def this_cpu_class() -> str:
    import platform

    from megaedge.runtime.machine import cpu_flags

    return cpu_class(cpu_flags(), platform.machine())


def advise(recipe: str | None, klass: str | None = None) -> Advice:
    """The recommended recipe for ``klass`` (this CPU's by default) and what is wrong with ``recipe`` there."""
    klass = klass or this_cpu_class()
    recommended = RECOMMENDED[klass]
    problem = None
    if recipe in _INACCURATE:
        problem = f"inaccurate ({_INACCURATE[recipe]})"
    elif recipe in _NO_PREFILL_GRAPH and klass not in _DOT_PRODUCT_CLASSES:
        problem = "slow (no prefill graph, and this CPU has no int8 dot products for megaedge's prompt kernel)"
    return Advice(klass, recommended, problem)


def warn_if_unsuited(info, providers: tuple[str, ...]) -> str | None:
    """Log one WARNING when the bundle's INT8 recipe is slow or inaccurate on this CPU; return the message."""
    if tuple(providers) != ("cpu",) or not info.quantization:
        return None
    recipe = (info.quantization.get("recipe") or {}).get("name")
    if not isinstance(recipe, str):
        return None
    advice = advise(recipe)
    if advice.problem is None:
        return None
    message = advice.warning(recipe)
    log.warning("%s", message)
    return message
