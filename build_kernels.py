"""Package build step: the native kernels (megaedge/assets/kernels/decoder.c) compiled into the package, one shared
object per instruction-set variant of the build machine's architecture (megaedge/assets/kernels/variants.py), so
that a wheel from ``pip wheel .`` runs the native decode path on any CPU of that architecture without a compiler
there. megaedge/runtime/kernels.py picks the best variant the CPU can run at load; a source checkout without these
libraries compiles the kernels at first use instead.

Wired from pyproject.toml ([tool.setuptools.cmdclass]): ``build_py`` writes the libraries into the build tree's
megaedge/_kernels/ (for an editable install, into the source tree's, which a generated .gitignore hides from git),
and ``bdist_wheel`` tags the wheel for the platform, since its libraries are machine code. The libraries are plain
shared objects loaded with ctypes, not Python extensions, so the tag is py3-none-<platform>: any Python 3 of that
platform loads them.

A variant the compiler cannot build (an old compiler without -march=x86-64-v4 or -mamx-tile) is left out with a
warning, and a machine without a compiler builds a package without libraries (warned too): the runtime then
compiles at first use where a compiler is, or keeps onnxruntime's decode step.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools.command.build_py import build_py

try:  # setuptools >= 70.1 carries bdist_wheel; older ones take it from the wheel package (pyproject requires it)
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover - depends on the build environment's setuptools
    from wheel.bdist_wheel import bdist_wheel

ROOT = Path(__file__).resolve().parent
KERNELS = ROOT / "megaedge" / "assets" / "kernels"
PACKAGE_DIR = "_kernels"  # megaedge/_kernels/ in the installed package
MANIFEST = "BUILD.json"
OPENMP_RUNTIME = "libgomp.so.1"


def _variants_module():
    """megaedge/assets/kernels/variants.py by path: the build environment cannot import megaedge (no numpy)."""
    spec = importlib.util.spec_from_file_location("_megaedge_kernel_variants", KERNELS / "variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _warn(message: str) -> None:
    # setuptools shows a build's stderr; pip shows it with -v, and on failure
    print(f"megaedge kernels: {message}", file=sys.stderr, flush=True)


def compiler() -> str | None:
    """The C compiler, as megaedge/runtime/kernels.py finds it: $CC, else cc, gcc or clang on PATH."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def source_digests() -> dict[str, str]:
    """sha256 of every file the libraries are built from (the kernel sources and variants.py): the runtime takes a
    prebuilt library only while these are the files it finds installed, so an edited checkout compiles afresh."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(KERNELS.iterdir()) if path.suffix in (".c", ".h", ".py")}


def _compile(cc: str, flags: tuple[str, ...], out: Path) -> str | None:
    """Compile decoder.c into ``out``; None, or the compiler's last error line."""
    tmp = out.with_suffix(".tmp")
    # $ORIGIN: the OpenMP runtime copied next to the libraries is found first, on a machine without one
    command = [cc, *flags, "-Wl,-rpath,$ORIGIN", "-o", str(tmp), str(KERNELS / "decoder.c"), "-lm"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        return (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    os.replace(tmp, out)
    return None


def _openmp_runtime(cc: str) -> Path | None:
    """GCC's OpenMP runtime the libraries link against, where the compiler knows it (clang's libomp is not copied)."""
    result = subprocess.run([cc, f"-print-file-name={OPENMP_RUNTIME}"], capture_output=True, text=True)
    found = Path(result.stdout.strip())
    return found.resolve() if result.returncode == 0 and found.is_absolute() and found.is_file() else None


def build_libraries(out_dir: Path, machine: str | None = None) -> list[Path]:
    """Compile every variant of ``machine`` (this one by default) into ``out_dir``; returns the files written
    (libraries, the OpenMP runtime they need, BUILD.json). Variants that fail are left out with a warning."""
    variants = _variants_module()
    machine = machine or platform.machine()
    table = variants.for_machine(machine)
    if not table:
        _warn(f"no prebuilt variants for {machine}: the kernels compile at first use on such machines")
        return []
    cc = compiler()
    if cc is None:
        _warn("no C compiler found (set CC, or install gcc or clang): the package has no prebuilt kernels, so "
              "they compile at first use where a compiler is")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("libmegaedge_*.so"):  # a variant that fails now must not leave an older build behind
        stale.unlink()

    def one(entry):
        name, flags, _ = entry
        return name, flags, _compile(cc, (*variants.COMMON_FLAGS, *flags), out_dir / variants.library_name(name))

    with ThreadPoolExecutor(max_workers=min(len(table), os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, table))
    built = {}
    for name, flags, error in results:
        if error is None:
            built[name] = [*variants.COMMON_FLAGS, *flags]
        else:
            _warn(f"variant {name} left out ({Path(cc).name} {' '.join(flags)}: {error})")
    written = [out_dir / variants.library_name(name) for name in built]
    if not built:
        _warn(f"{Path(cc).name} built no variant: the kernels compile at first use where a compiler is")
        return []
    runtime = _openmp_runtime(cc)
    if runtime is not None:
        # a device without a compiler often lacks the OpenMP runtime too (it comes with gcc); the libraries find this
        # copy by their $ORIGIN rpath. GCC's runtime library exception allows shipping it with them.
        shutil.copyfile(runtime, out_dir / OPENMP_RUNTIME)
        written.append(out_dir / OPENMP_RUNTIME)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    manifest = {"machine": machine, "compiler": version[0] if version else Path(cc).name, "variants": built,
                "openmp_runtime": OPENMP_RUNTIME if runtime is not None else None, "sources": source_digests()}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    written.append(out_dir / MANIFEST)
    print(f"megaedge kernels: built {', '.join(built)} for {machine} with {manifest['compiler']}", file=sys.stderr)
    return written


class BuildPy(build_py):
    """build_py, then the kernel libraries into the package (the build tree, or the source tree when editable)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            out_dir = ROOT / "megaedge" / PACKAGE_DIR
            out_dir.mkdir(exist_ok=True)
            # generated files in the source tree: keep them out of git without a tracked ignore rule
            (out_dir / ".gitignore").write_text("# generated by build_kernels.py (editable install)\n*\n")
        else:
            out_dir = Path(self.build_lib) / "megaedge" / PACKAGE_DIR
        written = build_libraries(out_dir)
        # an editable install's libraries stay in the source tree, which its import finder maps: nothing to install
        self._kernel_outputs = [] if getattr(self, "editable_mode", False) else [str(path) for path in written]

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), *getattr(self, "_kernel_outputs", [])]


class BdistWheel(bdist_wheel):
    """A platform wheel: the package carries machine code, though no Python extension."""

    def initialize_options(self):
        super().initialize_options()
        # what marks a distribution non-pure to setuptools: the wheel is then tagged for the platform and the
        # package installs to platlib, the wheel's root (not under .data/purelib)
        self.distribution.has_ext_modules = lambda: True

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat
