"""Facts about the machine a bundle runs on: CPU model and the int8 instruction sets its kernels can use, memory.

Shared by ``megaedge doctor`` and ``megaedge bench``: a latency figure means little without the CPU that made it
(the same bundle's int8 GEMV speed differs by instruction set: VNNI, AMX, ARM dot products)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# Instruction sets onnxruntime's int8 kernels pick from (x86: AVX2 / AVX-512 VNNI / AVX-VNNI / AMX; ARM: dot
# product and int8 matrix multiply).
INT8_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
VNNI_LIKE = {"avx512_vnni", "avx_vnni", "asimddp"}


def _cpuinfo() -> tuple[str | None, set[str]]:
    """(model name, feature flags) of the first CPU in /proc/cpuinfo; (None, empty) where Linux does not tell."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 ``flags``, ARM ``Features``); empty where /proc/cpuinfo is missing."""
    return _cpuinfo()[1]


def cpu_facts() -> dict:
    """``machine``, ``logical_cores``, ``model`` (the CPU's marketing name where Linux tells it), ``int8_features``
    (those of INT8_FEATURES the CPU has) and ``int8_note`` (what that means for the INT8 recipes)."""
    model, flags = _cpuinfo()
    return {
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "model": model or platform.processor() or "unknown",
        "int8_features": [f for f in INT8_FEATURES if f in flags],
        "int8_note": ("VNNI present: static INT8 (QDQ) matmuls are fast" if VNNI_LIKE & flags
                      else "no VNNI: prefer weight-only/dynamic INT8 (static QDQ can be slower than FP32)"),
    }


def memory_facts() -> dict:
    """Total and available RAM in GiB (None where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle}
        return {"total_gib": round(fields["MemTotal"] / 2**30, 1),
                "available_gib": round(fields["MemAvailable"] / 2**30, 1)}
    except (OSError, KeyError, ValueError, IndexError):
        return {"total_gib": None, "available_gib": None}


DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


def nvidia_smi(field: str) -> str | None:
    """One ``nvidia-smi --query-gpu`` field of the first GPU, or None without nvidia-smi (or a GPU it sees)."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def gpu_name(device_tree: Path = DEVICE_TREE_MODEL) -> str | None:
    """The first GPU's name from nvidia-smi, or a Jetson's board model (JetPack images have no nvidia-smi); None
    where neither tells."""
    name = nvidia_smi("name")
    if name:
        return name
    try:
        model = device_tree.read_text(errors="ignore").strip("\x00\n ")
    except OSError:
        return None
    return model if "jetson" in model.lower() else None
