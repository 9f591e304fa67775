"""The prebuilt variants of the kernel library (decoder.c): for each CPU architecture, one shared object per
instruction set, best first, each with the compiler flags that build it and the CPU flags (as Linux names them in
/proc/cpuinfo) that running it needs.

Plain data and the standard library only: build_kernels.py (the package build, where neither numpy nor megaedge is
importable) loads this file by path, and megaedge/runtime/kernels.py imports it to choose a variant at load, so the
two can never disagree about what a variant is.

The -march levels are the x86-64 psABI's (x86-64-v3: Haswell and Zen 1 on; v4: the AVX512 foundation of Skylake-SP,
Ice Lake, Zen 4) rather than CPU names: a CPU name lets the compiler use every extension of that CPU, and the
variant would then need them all. A variant's ``requires`` lists every extension its -march level and -m flags
allow the compiler to emit, so a CPU that lacks any one of them gets the next variant down.
"""

from __future__ import annotations

# Flags of every variant: -ffp-contract=off keeps one rounding per operation however the compiler vectorizes, which
# the tests' bit-identity between builds rests on; OpenMP runs the thread team.
COMMON_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")

_X86_64_V2 = ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")
_X86_64_V3 = (*_X86_64_V2, "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")  # abm: LZCNT
_X86_64_V4 = (*_X86_64_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")

# (name, compiler flags, CPU flags needed), best first. "amx" also needs Linux to grant the tile registers to the
# process (arch_prctl, asked by isa.h): where it refuses, the library reports AVX512-VNNI and the loader takes "vnni".
VARIANTS = {
    "x86_64": (
        ("amx", ("-march=x86-64-v4", "-mavx512vnni", "-mamx-tile", "-mamx-int8"),
         (*_X86_64_V4, "avx512_vnni", "amx_tile", "amx_int8")),
        ("vnni", ("-march=x86-64-v4", "-mavx512vnni"), (*_X86_64_V4, "avx512_vnni")),
        ("avx2", ("-march=x86-64-v3",), _X86_64_V3),
        ("portable", ("-march=x86-64",), ()),
    ),
    "aarch64": (
        ("dotprod", ("-march=armv8.2-a+dotprod",), ("asimddp",)),
        ("portable", ("-march=armv8-a",), ()),
    ),
}
ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}  # what platform.machine() says elsewhere


def for_machine(machine: str) -> tuple:
    """The variants of an architecture (``platform.machine()``), best first; empty for one without prebuilt kernels."""
    return VARIANTS.get(ALIASES.get(machine.lower(), machine.lower()), ())


def library_name(variant: str) -> str:
    return f"libmegaedge_{variant}.so"


def supported(machine: str, cpu_flags: set[str] | frozenset[str]) -> list[str]:
    """Names of the variants a CPU with ``cpu_flags`` can run, best first (the portable one always, last)."""
    return [name for name, _, needs in for_machine(machine) if set(needs) <= set(cpu_flags)]
