"""Builds of the native kernels against each other, outside Python: tests/runtime/kernel_crosscheck.c runs every
product, three whole decoder steps, batched steps beside solo ones and the encoder's conv stem on fixed inputs and
prints the results as hex floats.

The ARM dot-product path (Jetson Orin's CPU) cannot run on this project's x86 machines, so it is cross-compiled and
run under qemu's user-mode emulator where both are installed (Debian: ``apt install gcc-aarch64-linux-gnu
qemu-user-static``). It adds integers in the same order as the portable C path, so the two must agree bit for bit."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from megaedge.runtime import kernels, machine

DRIVER = Path(__file__).with_name("kernel_crosscheck.c")
CROSS_CC = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
HOST_CC = kernels.compiler()


def _run(cc: str, flags: list[str], out: Path, runner: tuple[str, ...] = ()) -> tuple[dict[str, np.ndarray], str]:
    """Compile the driver with the kernel source, run it; returns {case header: values} and the ISA line."""
    build = subprocess.run([cc, *flags, f"-I{kernels.SOURCE.parent}", str(DRIVER), "-o", str(out), "-lm"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([*runner, str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    cases: dict[str, list[float]] = {}
    for line in run.stdout.splitlines():
        if line[0].isalpha():
            current = cases.setdefault(line, [])
        else:
            current.append(float.fromhex(line))
    return {k: np.asarray(v, np.float32) for k, v in cases.items()}, run.stderr.strip()


def _portable(tmp_path: Path):
    return _run(HOST_CC, list(kernels.PORTABLE_FLAG_SETS[0]), tmp_path / "portable")


def _agrees_with_portable(built: dict[str, np.ndarray], isa: str, portable: dict[str, np.ndarray]) -> None:
    # exp and SwiGLU over 203 values each, 16 products, 6 prompt products, 2 x 3 steps from an empty cache, 2 x (a
    # chunked prefill + 3 steps), 4 stems, 2 x (a chunked prefill + 3 steps) over half-float caches, 2 x 2 x (the same
    # with heads of 128, float and half); then the packed layout: 16 products, 6 prompt products, 2 x 2 x (a chunked
    # prefill + 3 steps) over the row layout and the same over packed weights; then 2 threads x 2 batch sizes x 5
    # kinds (blocks of 32: plain, half caches with LoRA, packed with LoRA; blocks of 128, half; of 64, packed with
    # LoRA) x 2 steps of sequences stepped together (me_decode_batch) and the same stepped alone, and 2 threads x 2
    # kinds x 2 steps of 6 sequences; 4 prompt products at blocks of 16 and 64; 2 stems whose scratch parts are small
    # beside their alignment
    assert built.keys() == portable.keys() and len(built) == 2 + 118 + 2 * 40 + 2 * 8 + 4 + 2
    for case in built:  # packed weights (where the build packs) change nothing but where the bytes lie
        if case.endswith(" rows"):
            np.testing.assert_array_equal(built[case.replace(" rows", " packed")], built[case], err_msg=case)
    batched = [case for case in built if case.startswith("batch") and not case.endswith(" solo")]
    for case in batched:  # a sequence stepped in a batch gets the bits it gets alone, on every build
        np.testing.assert_array_equal(built[case], built[case + " solo"], err_msg=case)
    # AVX512 builds (isa 2, 4) and the portable one share the products' arithmetic, the decode step's too
    exact = ("gemm", "stem", "gemv") if isa.endswith(("isa 2", "isa 4")) else ("gemm", "stem")
    for case, want in portable.items():
        if case.startswith("batch") and " step 1" in case:
            continue  # a second step's inputs carry the first's float order: an int8 activation may round otherwise
        if case.startswith(("exp", "swiglu")):  # bit for bit: signs of zero and NaNs' bits too
            np.testing.assert_array_equal(built[case].view(np.uint32), want.view(np.uint32), err_msg=case)
            continue
        if case.startswith(exact):  # prompt products, the stem: one arithmetic on every build
            np.testing.assert_array_equal(built[case], want, err_msg=case)
            continue
        # vector paths sum a block's float terms in lanes: the order differs, not the arithmetic
        scale = float(np.abs(want).max())
        assert np.abs(built[case] - want).max() <= 1e-5 * scale, (case, isa)


@pytest.mark.skipif(HOST_CC is None, reason="no C compiler")
def test_this_machines_build_agrees_with_portable_c(tmp_path):
    native, isa = _run(HOST_CC, list(kernels.FLAG_SETS[0]), tmp_path / "native")
    portable, _ = _portable(tmp_path)
    _agrees_with_portable(native, isa, portable)


# the ISA each prebuilt variant's flags select in common.h (amx: 2 where Linux refuses the tile registers)
PREBUILT_ISA = {"amx": ("isa 4", "isa 2"), "vnni": ("isa 2",), "avx2": ("isa 1",), "portable": ("isa 0",),
                "dotprod": ("isa 3",)}


@pytest.mark.skipif(HOST_CC is None, reason="no C compiler")
@pytest.mark.parametrize("name,flags", [pytest.param(name, flags, id=name) for name, flags, _
                                        in kernels.variants.for_machine(platform.machine())])
def test_prebuilt_variant_flags_agree_with_portable_c(name, flags, tmp_path):
    """Each variant build_kernels.py ships, compiled with its own flags (not -march=native), on this CPU if it runs
    it: the ISA it was meant to select, and the arithmetic of every other build."""
    if name not in kernels.choose_variants(platform.machine(), machine.cpu_flags()):
        pytest.skip(f"this CPU cannot run the {name} variant")
    shared = ("-shared", "-fPIC")  # the driver is an executable around the same translation unit
    built, isa = _run(HOST_CC, [f for f in kernels.variants.COMMON_FLAGS if f not in shared] + list(flags),
                      tmp_path / name)
    assert isa in {f"abi {kernels.ABI_VERSION} {want}" for want in PREBUILT_ISA[name]}
    _agrees_with_portable(built, isa, _portable(tmp_path)[0])


@pytest.mark.skipif(HOST_CC is None or CROSS_CC is None or QEMU is None,
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt install gcc-aarch64-linux-gnu "
                           "qemu-user-static)")
def test_arm_dot_product_build_equals_portable_c_bit_for_bit(tmp_path):
    # the flags of a Jetson build (-march=native there) with Orin's instruction set named; static: qemu needs no
    # aarch64 libraries then
    flags = [f for f in kernels.FLAG_SETS[0] if f != "-march=native"] + ["-march=armv8.2-a+dotprod", "-static"]
    arm, isa = _run(CROSS_CC, flags, tmp_path / "arm", (QEMU, "-cpu", "max"))
    assert "isa 3" in isa  # the dot-product path compiled, not the portable fallback
    portable, _ = _portable(tmp_path)
    assert arm.keys() == portable.keys()
    for case in arm:  # the batch path too: every sequence its solo bits
        if case.startswith("batch") and not case.endswith(" solo"):
            np.testing.assert_array_equal(arm[case], arm[case + " solo"], err_msg=case)
    for case, want in portable.items():
        np.testing.assert_array_equal(arm[case].view(np.uint32), want.view(np.uint32), err_msg=case)


@pytest.mark.skipif(HOST_CC is None or shutil.which("valgrind") is None,
                    reason="needs a C compiler and valgrind (apt install valgrind)")
@pytest.mark.parametrize("variant", ["portable", "avx2"])
def test_build_touches_only_its_own_memory(variant, tmp_path):
    """Every case of the crosscheck in the portable build, and in the AVX2 one where this CPU runs it, under
    valgrind's memcheck: no read or write outside what was allocated (the conv stem's per-thread scratch once fell
    short of its parts' alignment, which only the portable build, with no packing scratch to absorb it, overran;
    AVX2's batched products read interleaved copies of the activations sized by hand). Memcheck sees accesses
    outside an allocation, not a buffer overrunning into another inside one (a thread's scratch is one block).
    Memcheck has no AVX512, so the other x86 builds are not run under it."""
    if variant == "portable":
        flags = list(kernels.PORTABLE_FLAG_SETS[0])
    else:
        prebuilt = {name: flags for name, flags, _ in kernels.variants.for_machine(platform.machine())}
        if "avx2" not in kernels.choose_variants(platform.machine(), machine.cpu_flags()):
            pytest.skip("this CPU cannot run the avx2 variant")
        flags = [f for f in kernels.variants.COMMON_FLAGS if f not in ("-shared", "-fPIC")] + list(prebuilt["avx2"])
    binary = tmp_path / variant
    build = subprocess.run([HOST_CC, *flags, f"-I{kernels.SOURCE.parent}", str(DRIVER), "-o", str(binary), "-lm"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run(["valgrind", "-q", "--error-exitcode=9", str(binary)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


EXP_DRIVER = Path(__file__).with_name("exp_every_float.c")


@pytest.mark.slow
@pytest.mark.skipif(HOST_CC is None or platform.machine() not in ("x86_64", "AMD64"),
                    reason="needs a C compiler on x86")
@pytest.mark.parametrize("variant", ["avx2", "vnni"])
def test_vector_exp_is_me_exp_on_every_float(variant, tmp_path):
    """me_exp8, which SwiGLU and the softmax run, gives me_exp's bits on all 2^32 inputs (~25 s a build)."""
    if variant not in kernels.choose_variants(platform.machine(), machine.cpu_flags()):
        pytest.skip(f"this CPU cannot run the {variant} variant")
    flags = {name: flags for name, flags, _ in kernels.variants.for_machine(platform.machine())}[variant]
    binary = tmp_path / variant
    build = subprocess.run([HOST_CC, "-O3", "-ffp-contract=off", *flags, f"-I{kernels.SOURCE.parent}",
                            str(EXP_DRIVER), "-o", str(binary), "-lm"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "differing 0" in run.stdout, run.stdout[-2000:]


@pytest.mark.skipif(CROSS_CC is None or QEMU is None, reason="needs aarch64-linux-gnu-gcc and qemu-aarch64")
def test_arm_vector_exp_is_me_exp_across_every_exponent(tmp_path):
    """me_exp4 against me_exp under qemu on 8 consecutive inputs of every 512 (every sign and exponent; all 2^32
    took 13 minutes emulated and differed nowhere)."""
    binary = tmp_path / "exp_arm"
    build = subprocess.run([CROSS_CC, "-O3", "-ffp-contract=off", "-march=armv8.2-a+dotprod", "-static",
                            "-DSTRIDE=64", f"-I{kernels.SOURCE.parent}", str(EXP_DRIVER), "-o", str(binary), "-lm"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([QEMU, "-cpu", "max", str(binary)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "differing 0" in run.stdout, run.stdout[-2000:]

