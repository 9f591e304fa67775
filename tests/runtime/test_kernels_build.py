"""Prebuilt kernels (build_kernels.py, megaedge/assets/kernels/variants.py, runtime/kernels.load_prebuilt): which
variant a CPU gets, when a prebuilt library is passed over, what a build writes, and (slow) that a wheel from
``pip wheel .`` runs the native decode step in a fresh runtime-only venv with no compiler on PATH."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import build_kernels
from megaedge.runtime import kernels
from tests.conftest import REPO, int8_bundle_from, speechlike

V2 = {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}
V3 = V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
NOISE = {"fpu", "sse", "sse2", "aes", "pclmulqdq", "rdrand", "hypervisor"}  # flags no variant looks at


@pytest.mark.parametrize("arch,flags,want", [
    ("x86_64", V4 | {"avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}, ["amx", "vnni", "avx2", "portable"]),  # SPR
    ("x86_64", V4 | {"avx512_vnni", "avx512_bf16"}, ["vnni", "avx2", "portable"]),  # Ice Lake, Zen 4
    ("x86_64", V4 | {"avx512_vnni", "amx_tile"}, ["vnni", "avx2", "portable"]),  # tiles without int8 products
    ("x86_64", V4, ["avx2", "portable"]),  # Skylake-SP: AVX512 without VNNI
    ("x86_64", V3 | {"avx_vnni"}, ["avx2", "portable"]),  # Alder Lake: AVX-VNNI is not AVX512-VNNI
    ("x86_64", V3, ["avx2", "portable"]),  # Haswell, Zen 1-3
    ("x86_64", V3 - {"movbe"}, ["portable"]),  # a hypervisor that hides one v3 extension
    ("x86_64", V2 | {"avx"}, ["portable"]),  # Sandy Bridge
    ("x86_64", set(), ["portable"]),  # no /proc/cpuinfo
    ("AMD64", V3, ["avx2", "portable"]),
    ("aarch64", {"fp", "asimd", "asimddp", "i8mm", "sve"}, ["dotprod", "portable"]),  # Orin, Graviton 3
    ("aarch64", {"fp", "asimd", "evtstrm", "crc32", "cpuid"}, ["portable"]),  # Raspberry Pi 4 (Cortex-A72)
    ("arm64", {"asimddp"}, ["dotprod", "portable"]),
    ("riscv64", {"rv64imafdc"}, []),  # no prebuilt variants: first-use compile only
])
def test_variant_chooser(arch, flags, want):
    assert kernels.choose_variants(arch, flags | NOISE) == want


def _manifest(directory: Path, variants: list[str], **changes) -> Path:
    """A BUILD.json as build_kernels.py writes it, for these sources, with ``changes``."""
    table = {name: flags for name, flags, _ in kernels.variants.for_machine("x86_64")}
    manifest = {"machine": "x86_64", "compiler": "test", "variants": {v: list(table[v]) for v in variants},
                "openmp_runtime": None, "sources": build_kernels.source_digests(), **changes}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / kernels.PREBUILT_MANIFEST).write_text(json.dumps(manifest))
    return directory


def test_build_and_runtime_agree_on_the_sources():
    assert build_kernels.source_digests().keys() == {path.name for path in kernels.SOURCES}
    assert "decoder.c" in build_kernels.source_digests() and "variants.py" in build_kernels.source_digests()


def test_prebuilt_passed_over_with_the_reason(tmp_path):
    assert kernels.load_prebuilt(tmp_path / "none", "x86_64", V3) == (None, "no prebuilt kernels in this install")
    other = _manifest(tmp_path / "arm", ["portable"], machine="aarch64")
    assert kernels.load_prebuilt(other, "x86_64", V3) == (
        None, "the prebuilt kernels are for aarch64, this machine is x86_64")
    edited = _manifest(tmp_path / "edited", ["portable"],
                       sources={**build_kernels.source_digests(), "decoder.c": "0" * 64})
    assert kernels.load_prebuilt(edited, "x86_64", V3) == (
        None, "the prebuilt kernels were built from other kernel sources than these (edited since?)")
    only_vnni = _manifest(tmp_path / "vnni", ["vnni"])
    assert kernels.load_prebuilt(only_vnni, "x86_64", V3) == (None, "no prebuilt kernel for this CPU (built: vnni)")


@pytest.mark.skipif(kernels.compiler() is None, reason="no C compiler to build a library to load")
def test_prebuilt_falls_through_to_the_next_variant(tmp_path):
    """A variant that does not load (here a corrupt file), or an AMX build whose process Linux refused the tiles
    (here the portable library standing in: it reports no AMX), gives way to the next one the CPU runs."""
    portable = kernels.build(variant="portable")
    assert portable.stat().st_mode & 0o755 == 0o755  # a shared cache: another user loads it (it was 0711)
    directory = _manifest(tmp_path / "prebuilt", ["amx", "vnni", "avx2", "portable"])
    shutil.copyfile(portable, directory / "libmegaedge_amx.so")
    (directory / "libmegaedge_vnni.so").write_bytes(b"not a shared object")
    shutil.copyfile(portable, directory / "libmegaedge_avx2.so")
    sapphire_rapids = V4 | {"avx512_vnni", "amx_tile", "amx_int8"}
    found, why_not = kernels.load_prebuilt(directory, "x86_64", sapphire_rapids)
    assert (found.variant, found.origin, found.isa, found.path, why_not) == (
        "avx2", "prebuilt", "portable-c", directory / "libmegaedge_avx2.so", "")
    none_load = _manifest(tmp_path / "broken", ["amx", "vnni", "avx2", "portable"])  # new files: loaded ones stay
    shutil.copyfile(portable, none_load / "libmegaedge_amx.so")
    for name in ("vnni", "avx2", "portable"):
        (none_load / f"libmegaedge_{name}.so").write_bytes(b"not a shared object")
    found, why_not = kernels.load_prebuilt(none_load, "x86_64", sapphire_rapids)
    assert found is None and why_not.startswith(
        "no prebuilt kernel loads here (amx: the kernel refused this process the AMX tile registers; vnni: ")


FAKE_CC = """#!/bin/sh
# a compiler without AMX support: the amx variant fails, the others "build" (an empty file is enough here)
case "$*" in
  --version) echo "fakecc 1.0"; exit 0;;
  -print-file-name=*) echo "${1#-print-file-name=}"; exit 0;;
  *-mamx-tile*) echo "fakecc: error: unrecognized command-line option '-mamx-tile'" >&2; exit 1;;
esac
while [ $# -gt 0 ]; do [ "$1" = "-o" ] && : > "$2"; shift; done
"""


def test_build_leaves_out_a_variant_the_compiler_cannot_build(tmp_path, monkeypatch, capfd):
    cc = tmp_path / "fakecc"
    cc.write_text(FAKE_CC)
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    written = build_kernels.build_libraries(tmp_path / "out", "x86_64")
    assert [p.name for p in written] == ["libmegaedge_vnni.so", "libmegaedge_avx2.so", "libmegaedge_portable.so",
                                         "BUILD.json"]
    manifest = json.loads((tmp_path / "out" / "BUILD.json").read_text())
    assert manifest == {"machine": "x86_64", "compiler": "fakecc 1.0", "openmp_runtime": None,
                        "sources": build_kernels.source_digests(),
                        "variants": {name: [*kernels.variants.COMMON_FLAGS, *flags] for name, flags, _
                                     in kernels.variants.for_machine("x86_64") if name != "amx"}}
    err = capfd.readouterr().err
    assert ("megaedge kernels: variant amx left out (fakecc -march=x86-64-v4 -mavx512vnni -mamx-tile -mamx-int8: "
            "fakecc: error: unrecognized command-line option '-mamx-tile')") in err


def test_build_without_a_compiler_writes_nothing(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(build_kernels.shutil, "which", lambda name: None)
    assert build_kernels.build_libraries(tmp_path / "out", "x86_64") == []
    assert not (tmp_path / "out").exists()
    assert "no C compiler found" in capfd.readouterr().err


def _runtime_closure() -> list[md.Distribution]:
    """The installed distributions megaedge's runtime needs (its requirements without extras, and theirs)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo, found = list(md.requires("megaedge") or []), {}
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name not in found:
            found[name] = md.distribution(req.name)
            todo += found[name].requires or []
    return list(found.values())


def _link_runtime(target: Path) -> None:
    """Symlinks to the runtime distributions' top-level files (their packages and dist-info) in ``target``: the
    fresh venv imports exactly those, with nothing downloaded."""
    target.mkdir()
    for dist in _runtime_closure():
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (target / top).exists():
                (target / top).symlink_to(Path(dist.locate_file(top)).resolve())


@pytest.mark.slow
def test_wheel_runs_native_decode_without_a_compiler(fixture_bundles, tmp_path):
    # build: the tree as pip sees it, outside the checkout so no build/ or egg-info is left there
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "build_kernels.py"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "megaedge", source / "megaedge", ignore=shutil.ignore_patterns("__pycache__", "_kernels"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", str(tmp_path / "wheels")],
                           cwd=source, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").iterdir()
    assert wheel.name == f"megaedge-{md.version('megaedge')}-py3-none-linux_{platform.machine()}.whl"

    # install: a plain venv, the wheel alone, and the runtime dependencies linked in (no torch, no onnx)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                              "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('platlib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    _link_runtime(tmp_path / "runtime")
    (site / "megaedge_test_runtime.pth").write_text(f"{tmp_path / 'runtime'}\n")
    installed = site / "megaedge" / "_kernels"
    want, why_not = kernels.load_prebuilt(installed)
    assert want is not None, why_not
    best = kernels.choose_variants(platform.machine(), kernels.machine.cpu_flags())[0]
    assert want.variant == best or (best, want.variant) == ("amx", "vnni")  # vnni: Linux refused the AMX tiles

    # run: only the venv's bin on PATH (no cc, gcc or clang), CC unset, an empty kernel cache, and a working directory
    # outside the checkout (python -c would import megaedge from the current one)
    env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path / "home"), "MEGAEDGE_CACHE": str(tmp_path / "cache"),
           "LANG": "C.UTF-8"}
    env.update({k: os.environ[k] for k in ("SYSTEMROOT", "TMPDIR") if k in os.environ})
    which = subprocess.run([venv / "bin" / "python", "-c", "import shutil; from megaedge.runtime import kernels; "
                            "import megaedge; print(shutil.which('cc'), shutil.which('gcc'), shutil.which('clang'), "
                            "kernels.compiler(), megaedge.__file__)"], env=env, capture_output=True, text=True,
                           cwd=tmp_path)
    assert which.stdout.split() == ["None"] * 4 + [str(site / "megaedge" / "__init__.py")], which.stderr[-2000:]

    doctor = subprocess.run([venv / "bin" / "megaedge", "doctor"], env=env, capture_output=True, text=True,
                            cwd=tmp_path)
    assert doctor.returncode == 0, doctor.stderr[-3000:]
    assert (f"kernels      {want.variant}, prebuilt (isa {want.isa}; {installed / want.path.name})"
            in doctor.stdout.splitlines()), doctor.stdout
    assert "torch        not installed (runtime-only install)" in doctor.stdout.splitlines()

    import soundfile as sf

    (tmp_path / "int8").mkdir()
    bundle = int8_bundle_from(fixture_bundles["merged"], tmp_path / "int8")
    clip = tmp_path / "clip.wav"
    sf.write(str(clip), speechlike(3.0, seed=5), 16000)
    # --decode native: an error, not onnxruntime's step, if the native kernels cannot be had
    run = subprocess.run([venv / "bin" / "megaedge", "-v", "transcribe", str(bundle), str(clip), "--decode", "native",
                          "--json"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["file"] == str(clip)
    assert "compiling them here" not in run.stderr and not (tmp_path / "cache" / "kernels").exists()
    print(f"wheel {wheel.name} {wheel.stat().st_size} bytes; doctor: {want.variant}, prebuilt ({want.isa}); "
          f"{run.stderr.strip().splitlines()}")



def test_pinned_kernels_serve_every_later_load(monkeypatch):
    """kernels.pin: a benchmark runs another build's arithmetic through the whole runtime (int8_recipes.py
    --kernels portable); load() returns the pinned build until the process ends."""
    monkeypatch.setattr(kernels, "_loaded", {})
    try:
        portable = kernels.Q8Kernels(kernels.build(variant="portable"))
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no portable build here: {exc}")
    kernels.pin(portable)
    assert kernels.load() is portable and portable.isa == "portable-c"
