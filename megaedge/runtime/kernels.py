"""The native CPU kernels (megaedge/assets/kernels/decoder.c and its parts), loaded with ctypes.

A package built by ``pip wheel .`` / ``pip install .`` carries them prebuilt (build_kernels.py): one shared object
per instruction-set variant of its architecture in megaedge/_kernels/ (x86-64: portable, AVX2, AVX512-VNNI, AMX;
aarch64: portable, dot product; megaedge/assets/kernels/variants.py), of which ``load`` takes the best the CPU's
flags allow, as ggml's CPU variants are chosen. So a device needs no compiler. A prebuilt library is used only
while the kernel sources installed beside it are the ones it was built from (an edited editable checkout compiles
afresh).

Without a usable prebuilt library (a source checkout, a build machine without a compiler, an architecture without
variants) the kernels are compiled here at first use, with the machine's C compiler and ``-march=native``. That
build is cached under ``$MEGAEDGE_CACHE`` (default ``~/.cache/megaedge``) keyed by the sources, the compiler and
the CPU, so a copied home directory never hands a binary to a CPU it was not built for. ``megaedge prepare`` loads
it ahead of time; with neither, the runtime keeps onnxruntime's decode step and says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from megaedge.runtime import features, machine

log = logging.getLogger("megaedge.runtime.kernels")

KERNEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "kernels"
SOURCE = KERNEL_DIR / "decoder.c"  # the one translation unit; it includes the other parts
# what a build is made from (every part, and variants.py's flags): a cached or prebuilt build is used only for these
SOURCES = tuple(sorted(path for path in KERNEL_DIR.iterdir() if path.suffix in (".c", ".h", ".py")))
PREBUILT_DIR = Path(__file__).resolve().parents[1] / "_kernels"  # written by build_kernels.py
PREBUILT_MANIFEST = "BUILD.json"
ABI_VERSION = 10
MAX_BATCH = 16  # ME_MAX_BATCH in decode_batch.h
ISA_NAMES = {4: "avx512-vnni+amx", 2: "avx512-vnni", 1: "avx2", 3: "arm-dotprod", 0: "portable-c"}
# -ffp-contract=off: one rounding per operation however the compiler unrolls or vectorizes a loop, so a row computed
# as one of four streams or alone, by any thread, gives the same bits (tests hold the decode step to it).
FLAG_SETS = (("-O3", "-march=native", "-fopenmp", "-ffp-contract=off"), ("-O3", "-fopenmp", "-ffp-contract=off"),
             ("-O3", "-ffp-contract=off"))
PORTABLE_FLAG_SETS = (("-O3", "-fopenmp", "-DME_PORTABLE", "-ffp-contract=off"),
                      ("-O3", "-DME_PORTABLE", "-ffp-contract=off"))
# The AVX2 path on a CPU that also has AVX512: what a CPU without AVX512 runs, testable on one with it.
AVX2_FLAG_SETS = (("-O3", "-march=native", "-mno-avx512f", "-fopenmp", "-ffp-contract=off"),)
# The AVX512-VNNI prompt on a CPU with AMX tiles: what AVX512 CPUs without AMX run (and a baseline for AMX's gain).
VNNI_FLAG_SETS = (("-O3", "-march=native", "-mno-amx-tile", "-mno-amx-int8", "-fopenmp", "-ffp-contract=off"),)
VARIANT_FLAGS = {"native": FLAG_SETS, "portable": PORTABLE_FLAG_SETS, "avx2": AVX2_FLAG_SETS, "vnni": VNNI_FLAG_SETS}


def _variants_module():
    """megaedge/assets/kernels/variants.py, which build_kernels.py also reads (by path: it cannot import megaedge)."""
    spec = importlib.util.spec_from_file_location("megaedge_kernel_variants", KERNEL_DIR / "variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


variants = _variants_module()


def cache_dir() -> Path:
    root = os.environ.get("MEGAEDGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megaedge"
    return Path(root) / "kernels"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def _key(cc: str) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in SOURCES))
    for part in (*version, repr(VARIANT_FLAGS), machine.cpu_facts()["model"], " ".join(sorted(machine.cpu_flags())),
                 os.uname().machine):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def build(force: bool = False, portable: bool = False, variant: str = "native") -> Path:
    """Compile the kernels for this machine (or find the cached build); returns the shared object's path.
    ``portable`` (variant ``portable``): the plain C form only (no vector instructions), which CPUs without a tuned
    path run; variant ``avx2``: the AVX2 path even where the CPU has AVX512; ``vnni``: AVX512 without AMX tiles;
    tests hold them all to the same arithmetic. These are this machine's builds (-march=native less what a variant
    leaves out); the package's prebuilt variants are variants.py's. Raises RuntimeError naming what failed."""
    variant = "portable" if portable else variant
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    out = cache_dir() / f"megaedge-{_key(cc)}{'' if variant == 'native' else '-' + variant}.so"
    if out.is_file() and not force:
        if out.stat().st_mode & 0o044 != 0o044:  # built by a megaedge that left it unreadable to other users
            with contextlib.suppress(OSError):
                out.chmod(0o755)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in VARIANT_FLAGS[variant]:  # -march=native or OpenMP can be missing
        with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
            pass
        result = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp.name, str(SOURCE), "-lm"],
                                capture_output=True, text=True)
        if result.returncode == 0:
            os.chmod(tmp.name, 0o755)  # a shared cache: the service user loads what an admin's prepare built
            os.replace(tmp.name, out)  # atomic: a concurrent build never loads a half-written file
            log.info("built %s with %s %s", out.name, Path(cc).name, " ".join(flags))
            return out
        Path(tmp.name).unlink(missing_ok=True)  # the compiler may have removed it (a full disk): say its error
        errors.append(f"{' '.join(flags)}: {(result.stderr.strip().splitlines() or ['failed'])[-1]}")
    raise RuntimeError(f"{cc} could not build {SOURCE.name} ({'; '.join(errors)})")


def _structs(abi: int) -> SimpleNamespace:
    """The ctypes mirrors of the kernel library's structs at ABI ``abi`` (a benchmark may load an earlier revision's
    library beside this one; before ABI 10 ``me_linear`` had no ``packed`` field)."""

    class LinearStruct(ctypes.Structure):
        """``me_linear``: one MatMulNBits weight, uint8 [n, nb, blk] and float32 scales [n, nb], or those rows in
        the library's packed layout (``packed``: the rows per group, me_pack_q8; 0: the row layout)."""
        _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("n", ctypes.c_int32), ("k", ctypes.c_int32),
                    ("nb", ctypes.c_int32), ("blk", ctypes.c_int32)] + ([("packed", ctypes.c_int32)] if abi >= 10
                                                                         else [])

    class LayerStruct(ctypes.Structure):
        """``me_layer``: a decoder layer's projections, norm weights and KV cache ([kv_heads, capacity, dim] of
        float32, or of float16 where the model's ``kv_half`` says so)."""
        _fields_ = [*[(name, LinearStruct) for name in ("q", "k", "v", "o", "gate", "up", "down")],
                    *[(name, ctypes.c_void_p) for name in ("input_norm", "post_norm", "q_norm", "k_norm", "keys",
                                                            "values")]]

    class LoraStruct(ctypes.Structure):
        """``me_lora``: a routed decoder's low-rank branch of one projection, float32 A [k, rank] and B [rank, n]."""
        _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("rank", ctypes.c_int32)]

    class ModelStruct(ctypes.Structure):
        """``me_model``: geometry, layers, final norm and LM head of one decoder step; a routed decoder's branches
        ([layers * 7] in NATIVE_PROJECTIONS order, or NULL), this sequence's gate (1: the LoRA route, 0: the
        base) and its caches' type (``kv_half`` 1: float16)."""
        _fields_ = [*[(name, ctypes.c_int32) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim",
                                                           "intermediate", "capacity", "vocab")],
                    ("eps", ctypes.c_float), ("scaling", ctypes.c_float), ("layer", ctypes.POINTER(LayerStruct)),
                    ("lm_head", LinearStruct), ("final_norm", ctypes.c_void_p),
                    ("lora", ctypes.POINTER(LoraStruct)), ("lora_gate", ctypes.c_float), ("kv_half", ctypes.c_int32)]

    return SimpleNamespace(Linear=LinearStruct, Layer=LayerStruct, Lora=LoraStruct, Model=ModelStruct)


STRUCTS = _structs(ABI_VERSION)
LinearStruct, LayerStruct, LoraStruct, ModelStruct = STRUCTS.Linear, STRUCTS.Layer, STRUCTS.Lora, STRUCTS.Model


@dataclass(frozen=True)
class Quantized:
    """An activation vector quantized per block: int8 values, one scale and one sum per block."""
    q: np.ndarray
    scales: np.ndarray
    sums: np.ndarray


class Q8Kernels:
    """ctypes front of the shared object; arrays are passed by pointer, so callers keep them contiguous.
    ``variant``: which build (a prebuilt variant's name, or build()'s); ``origin``: "prebuilt" (shipped in the
    package) or "compiled here" (first use)."""

    def __init__(self, path: Path, variant: str = "native", origin: str = "compiled here",
                 abis: tuple[int, ...] = (ABI_VERSION,)):
        """``abis``: the library versions accepted (a benchmark's older revision may add ones whose structs are a
        prefix of this version's)."""
        passive_openmp()
        lib = ctypes.CDLL(str(path))
        if lib.me_abi_version() not in abis:
            raise RuntimeError(f"{path.name}: kernel ABI {lib.me_abi_version()}, this megaedge needs {ABI_VERSION}")
        p, i = ctypes.c_void_p, ctypes.c_int
        self.abi = lib.me_abi_version()
        self.structs = structs = STRUCTS if self.abi == ABI_VERSION else _structs(self.abi)
        model = structs.Model
        lib.me_quantize.argtypes = [p, p, ctypes.c_float, i, i, i, p, p, p, p]
        lib.me_quantize.restype = None
        lib.me_gemv_q8.argtypes = [p, p, p, p, p, p, i, i, i, i] + ([i] if self.abi >= 10 else [])
        lib.me_gemv_q8.restype = None
        lib.me_gemm_q8.argtypes = [p, p, p, p, p, p, i, i, i, i, i] + ([i] if self.abi >= 10 else [])
        lib.me_gemm_q8.restype = ctypes.c_int
        lib.me_decode_step.argtypes = [ctypes.POINTER(model), p, i, p, p, p, i]
        lib.me_decode_step.restype = ctypes.c_int
        lib.me_decode_batch.argtypes = [ctypes.POINTER(ctypes.POINTER(model)), i, p, p, p, p, p, i]
        lib.me_decode_batch.restype = ctypes.c_int
        lib.me_prefill.argtypes = [ctypes.POINTER(model), p, i, i, p, p, p, i, i]
        lib.me_prefill.restype = ctypes.c_int
        lib.me_conv_stem.argtypes = [p, i, i, i, i, p, p, i, p, p, p, p, p, p, i, p, i]
        lib.me_conv_stem.restype = ctypes.c_int
        if self.abi >= 10:
            lib.me_pack_lanes.argtypes = [i]
            lib.me_pack_lanes.restype = i
            lib.me_pack_q8.argtypes = [p, p, i, i, i, p, p]
            lib.me_pack_q8.restype = i
        self._lib, self.path, self.variant, self.origin = lib, path, variant, origin
        self.isa = ISA_NAMES.get(lib.me_isa(), "unknown")

    def quantize(self, x: np.ndarray, block: int, blocks: int, norm: np.ndarray | None = None,
                 eps: float = 0.0) -> Quantized:
        """Per-block int8 of ``x`` (first RMS-normalized with weight ``norm`` and ``eps`` when given)."""
        x = np.ascontiguousarray(x, np.float32)
        out = Quantized(np.empty(block * blocks, np.int8), np.empty(blocks, np.float32), np.empty(blocks, np.int32))
        scratch = np.empty_like(x) if norm is not None else None
        self._lib.me_quantize(x.ctypes.data, None if norm is None else norm.ctypes.data, eps, x.size, block, blocks,
                              out.q.ctypes.data, out.scales.ctypes.data, out.sums.ctypes.data,
                              None if scratch is None else scratch.ctypes.data)
        return out

    def gemv(self, weight: np.ndarray, scales: np.ndarray, x: Quantized, out: np.ndarray, threads: int,
             packed: int = 0) -> np.ndarray:
        """out[n] = sum over blocks of scales[n, b] * x.scales[b] * <weight[n, b] - 128, x.q[b]>; with ``packed``
        the weights and scales are ``pack_matrix``'s (n: out's length)."""
        n, blocks, block = (out.shape[0], *weight.shape[1:]) if packed else weight.shape
        self._lib.me_gemv_q8(weight.ctypes.data, scales.ctypes.data, x.q.ctypes.data, x.scales.ctypes.data,
                             x.sums.ctypes.data, out.ctypes.data, n, blocks, block, team(threads), *self._layout(packed))
        return out

    def pack_matrix(self, weight: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(weights, scales, lanes) of ``weight`` [n, blocks, block] in this library's packed layout (``pack``):
        [rows rounded up to lanes, blocks, block] in 64-byte aligned memory; lanes 0 and the inputs where this
        library keeps that block size in the row layout."""
        n, blocks, block = weight.shape
        lanes = self.pack_lanes(block)
        if not lanes:
            return weight, scales, 0
        rows = -(-n // lanes) * lanes
        room = np.empty(rows * blocks * block + 64, np.uint8)
        start = -room.ctypes.data % 64
        out = room[start : start + rows * blocks * block].reshape(rows, blocks, block)
        out_scales = np.empty((rows, blocks), np.float32)
        self.pack(np.ascontiguousarray(weight), np.ascontiguousarray(scales, np.float32), out, out_scales)
        return out, out_scales, lanes

    def _layout(self, packed: int) -> tuple[int, ...]:
        """The products' layout argument (none before ABI 10, whose products read the row layout only)."""
        if self.abi < 10 and packed:
            raise ValueError(f"{self.path.name}: kernel ABI {self.abi} reads no packed weights")
        return (packed,) if self.abi >= 10 else ()

    def pack_lanes(self, block: int) -> int:
        """Rows per group where this library keeps a matrix of ``block``-sized blocks packed (``pack``), else 0:
        then its decode and prompt products read the packed layout in place."""
        return self._lib.me_pack_lanes(block) if self.abi >= 10 else 0

    def pack(self, weight: np.ndarray, scales: np.ndarray, out_weight: np.ndarray, out_scales: np.ndarray) -> None:
        """Rows weight uint8 [n, blocks, block] and scales float32 [n, blocks] into the packed layout (me_pack_q8):
        out_weight holds ceil(n / lanes) * lanes * blocks * block bytes (64-byte aligned), out_scales as many
        scales as that many rows have; rows past n are zero weights."""
        n, blocks, block = weight.shape
        lanes = self.pack_lanes(block)
        rows = -(-n // lanes) * lanes if lanes else 0
        if (not lanes or scales.shape != (n, blocks) or out_weight.nbytes < rows * blocks * block
                or out_scales.size < rows * blocks
                or out_weight.ctypes.data % 64 or not weight.flags.c_contiguous or not scales.flags.c_contiguous):
            raise ValueError(f"native pack: {weight.shape} into {out_weight.nbytes} bytes with {lanes} lanes")
        self._lib.me_pack_q8(weight.ctypes.data, scales.ctypes.data, n, blocks, block, out_weight.ctypes.data,
                             out_scales.ctypes.data)

    def quantize_rows(self, x: np.ndarray, block: int, blocks: int) -> Quantized:
        """``quantize`` of every row of x [rows, k]: q [rows, blocks * block], scales and sums [rows, blocks]."""
        parts = [self.quantize(row, block, blocks) for row in np.atleast_2d(x)]
        return Quantized(np.stack([p.q for p in parts]), np.stack([p.scales for p in parts]),
                         np.stack([p.sums for p in parts]))

    def gemm(self, weight: np.ndarray, scales: np.ndarray, x: Quantized, out: np.ndarray, threads: int,
             packed: int = 0) -> np.ndarray:
        """``gemv`` of every row of ``x`` (from ``quantize_rows``) in one pass over the weights: out [rows, n]."""
        n, blocks, block = (out.shape[1], *weight.shape[1:]) if packed else weight.shape
        if self._lib.me_gemm_q8(weight.ctypes.data, scales.ctypes.data, x.q.ctypes.data, x.scales.ctypes.data,
                                x.sums.ctypes.data, out.ctypes.data, x.q.shape[0], n, blocks, block, team(threads),
                                *self._layout(packed)) != 0:
            raise MemoryError("native matrix product: no memory for its packing buffers")
        return out

    def decode_batch(self, models: list[ModelStruct], x: np.ndarray, pos: np.ndarray, cos: np.ndarray,
                     sin: np.ndarray, logits: np.ndarray, threads: int) -> None:
        """One decoder step of each of ``models`` (sequences over the same weights, each with its own caches; see
        decode_batch.h, me_decode_batch): x [B, hidden] embeddings, overwritten; pos int32 [B]; cos/sin
        [B, head_dim]; logits [B, vocab] written. Each sequence gets the bits ``decode_step`` gives it alone."""
        pointers = (ctypes.POINTER(self.structs.Model) * len(models))(*[ctypes.pointer(m) for m in models])
        status = self._lib.me_decode_batch(pointers, len(models), x.ctypes.data, pos.ctypes.data, cos.ctypes.data,
                                           sin.ctypes.data, logits.ctypes.data, team(threads))
        if status == -2:
            raise ValueError(f"native decode batch of {len(models)} sequences: 1-{MAX_BATCH} per call")
        if status != 0:
            raise MemoryError("native decode batch: no memory for its scratch buffers")

    def decode_step(self, model: ModelStruct, x: np.ndarray, pos: int, cos: np.ndarray, sin: np.ndarray,
                    logits: np.ndarray, threads: int) -> None:
        """One decoder step of ``model`` (see decode_step.h, me_decode_step): x [hidden] is the token's embedding and
        is overwritten; every layer's cache gets position ``pos``; logits [vocab] are written."""
        if self._lib.me_decode_step(ctypes.byref(model), x.ctypes.data, pos, cos.ctypes.data, sin.ctypes.data,
                                    logits.ctypes.data, team(threads)) != 0:
            raise MemoryError("native decode step: no memory for its scratch buffers")

    def prefill(self, model: ModelStruct, x: np.ndarray, start: int, cos: np.ndarray, sin: np.ndarray,
                logits: np.ndarray, threads: int, logit_rows: int = 1) -> None:
        """Rows x [rows, hidden] (embeddings, overwritten) at positions start.. through ``model`` (prefill.h,
        me_prefill): every layer's cache gets those positions; logits [logit_rows, vocab] (or [vocab] for one) are
        those of the last ``logit_rows`` rows, none for 0. cos/sin [rows, head_dim]; the caches must hold positions
        [0, start) already."""
        if not 0 <= logit_rows <= x.shape[0] or logits.size < logit_rows * model.vocab:
            raise ValueError(f"native prefill: logits of {logit_rows} rows asked of {x.shape[0]} rows into "
                             f"{logits.size} floats")
        if self._lib.me_prefill(ctypes.byref(model), x.ctypes.data, x.shape[0], start, cos.ctypes.data,
                                sin.ctypes.data, logits.ctypes.data, logit_rows, team(threads)) != 0:
            raise MemoryError(f"native prefill: no memory for the scratch buffers of {x.shape[0]} rows")

    def conv_stem(self, mel: np.ndarray, weights: StemWeights, threads: int) -> np.ndarray:
        """The encoder's convolution stem (conv_stem.h) over mel [windows, bins, chunks * frames] in chunks of
        ``weights.chunk_frames``: [windows * chunks, T, channels * F], the rows conv_out reads."""
        mel = np.ascontiguousarray(mel, np.float32)
        windows, bins, width = mel.shape
        frames = weights.chunk_frames
        if width % frames or bins != weights.bins:
            raise ValueError(f"native stem: mel {mel.shape} is not [windows, {weights.bins}, chunks * {frames}]")
        chunks, steps = width // frames, features.chunk_token_count(frames)
        out = np.empty((windows * chunks, steps, weights.channels * features.chunk_token_count(bins)), np.float32)
        if self._lib.me_conv_stem(mel.ctypes.data, windows, chunks, bins, frames, weights.w1.ctypes.data,
                                  weights.b1.ctypes.data, weights.channels, weights.w2.ctypes.data,
                                  weights.s2.ctypes.data, weights.b2.ctypes.data, weights.w3.ctypes.data,
                                  weights.s3.ctypes.data, weights.b3.ctypes.data, weights.block, out.ctypes.data,
                                  team(threads)) != 0:
            raise MemoryError("native stem: no memory for its scratch buffers")
        return out


@dataclass(frozen=True)
class StemWeights:
    """The convolution stem as conv_stem.h takes it: w1 float32 [9, C] (tap-major), w2/w3 uint8 [C, 9 * Cp / block,
    block] (value + 128; inputs ordered tap, then channel padded to Cp) with float32 scales [C, 9 * Cp / block],
    float32 biases [C]."""
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    s2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    s3: np.ndarray
    b3: np.ndarray
    block: int
    bins: int
    chunk_frames: int

    @property
    def channels(self) -> int:
        return self.b1.shape[0]

    def __post_init__(self):
        c, block = self.channels, self.block
        blocks = 9 * (-(-c // block))
        want = {"w1": ((9, c), np.float32), "b1": ((c,), np.float32), "b2": ((c,), np.float32),
                "b3": ((c,), np.float32), "w2": ((c, blocks, block), np.uint8), "w3": ((c, blocks, block), np.uint8),
                "s2": ((c, blocks), np.float32), "s3": ((c, blocks), np.float32)}
        for name, (shape, dtype) in want.items():
            array = getattr(self, name)
            if array.shape != shape or array.dtype != dtype or not array.flags.c_contiguous:
                raise ValueError(f"native stem: {name} is {array.dtype}{list(array.shape)}, needs a contiguous "
                                 f"{np.dtype(dtype).name}{list(shape)}")


def choose_variants(arch: str, cpu_flags: set[str] | frozenset[str]) -> list[str]:
    """Prebuilt variants a CPU of architecture ``arch`` (platform.machine()) with ``cpu_flags`` (/proc/cpuinfo's)
    can run, best first; empty for an architecture without prebuilt variants."""
    return variants.supported(arch, cpu_flags)


def passive_openmp() -> None:
    """OpenMP threads that sleep between parallel regions unless the user chose otherwise (OMP_WAIT_POLICY).

    GNU OpenMP spins a while after each region by default; on a device whose cores are shared with other work
    (the audio pipeline, a second stream, the rest of the product) the spinning threads take the cores the others
    need, and hop latency multiplies (benchmarks/contention.py). libgomp reads the policy once, when it starts, so
    this runs before the first kernel library loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _Fork:
    """Which thread of a forked child holds its parent's GNU OpenMP team.

    libgomp keeps a thread's team (its pool of workers) with the thread that started it, and does not survive
    fork(): a child whose forking thread had run a parallel kernel waits for ever on the parent's workers at that
    thread's first parallel region (a gunicorn pre-fork with a warm-up, a multiprocessing pool forked after a first
    transcription). The child's other threads start teams of their own, and loading alone starts none, so a bundle
    loaded before the fork (its weights shared copy-on-write) serves them."""

    started = threading.local()  # .team: this thread has started a team
    stale_thread: int | None = None  # in a forked child: the thread whose team is its parent's
    parent = 0


def _after_fork_in_child() -> None:
    if getattr(_Fork.started, "team", False):
        _Fork.stale_thread, _Fork.parent = threading.get_ident(), os.getppid()


os.register_at_fork(after_in_child=_after_fork_in_child)


def team(threads: int) -> int:
    """``threads`` for a parallel kernel, or one line where it would hang (see _Fork)."""
    if threads > 1:
        if _Fork.stale_thread is not None and threading.get_ident() == _Fork.stale_thread:
            from megaedge.errors import MegaedgeError

            raise MegaedgeError(
                f"this process was forked from process {_Fork.parent} by a thread that had run the native kernels, "
                "whose OpenMP threads do not survive fork(): load the Transcriber in each process after it "
                "starts (gunicorn: without --preload, or in post_fork; multiprocessing: the 'spawn' start method "
                "or a Pool initializer), run the parent's work in another thread, or pass threads=1")
        _Fork.started.team = True
    return threads


def load_prebuilt(directory: Path | None = None, arch: str | None = None,
                  cpu_flags: set[str] | None = None) -> tuple[Q8Kernels | None, str]:
    """The best prebuilt library of ``directory`` (the package's megaedge/_kernels/) this CPU runs, and "", or None
    and why none is."""
    directory = PREBUILT_DIR if directory is None else directory
    arch = arch or platform.machine()
    try:
        built = json.loads((directory / PREBUILT_MANIFEST).read_text())
    except (OSError, ValueError):
        return None, "no prebuilt kernels in this install"
    if variants.ALIASES.get(arch.lower(), arch.lower()) != built.get("machine"):
        return None, f"the prebuilt kernels are for {built.get('machine')}, this machine is {arch}"
    current = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in SOURCES}
    if built.get("sources") != current:
        return None, "the prebuilt kernels were built from other kernel sources than these (edited since?)"
    candidates = [name for name in choose_variants(arch, machine.cpu_flags() if cpu_flags is None else cpu_flags)
                  if name in built.get("variants", {})]
    problems = []
    for name in candidates:
        try:
            found = Q8Kernels(directory / variants.library_name(name), variant=name, origin="prebuilt")
        except (OSError, RuntimeError) as exc:  # a missing OpenMP runtime, a stale ABI: the next variant may do
            problems.append(f"{name}: {exc}")
            continue
        if name == "amx" and found.isa != ISA_NAMES[4]:
            # Linux refused the tile registers (isa.h asks): the AVX512-VNNI variant runs that CPU's prompts better,
            # with the tile size its vectors are tuned for
            problems.append("amx: the kernel refused this process the AMX tile registers")
            continue
        log.debug("native kernels: prebuilt %s (%s)", name, found.isa)
        return found, ""
    if not candidates:
        return None, f"no prebuilt kernel for this CPU (built: {', '.join(built.get('variants', {})) or 'none'})"
    return None, f"no prebuilt kernel loads here ({'; '.join(problems)})"


_loaded: dict[str, Q8Kernels | str] = {}


def _load() -> Q8Kernels:
    found, why_not = load_prebuilt()
    if found is not None:
        return found
    if PREBUILT_DIR.is_dir():  # shipped libraries that do not serve: worth a line, unlike a plain source checkout
        log.info("native kernels: %s; compiling them here", why_not)
    try:
        return Q8Kernels(build())
    except RuntimeError as exc:
        raise RuntimeError(f"{why_not}, and {exc}") from None


def pin(built: Q8Kernels) -> None:
    """Make ``load`` return ``built`` from now on in this process: a benchmark that runs another build's arithmetic
    (e.g. the portable build, which the ARM dot-product build equals bit for bit) through the whole runtime."""
    _loaded["kernels"] = built


def load() -> Q8Kernels:
    """The kernels for this machine: the best prebuilt variant, else built here on first use; raises RuntimeError
    (cached) when neither can be had."""
    if "kernels" not in _loaded:
        try:
            _loaded["kernels"] = _load()
        except (RuntimeError, OSError) as exc:
            _loaded["kernels"] = str(exc)
    found = _loaded["kernels"]
    if isinstance(found, str):
        raise RuntimeError(found)
    return found


def describe() -> dict:
    """What ``load`` gives here, for ``megaedge doctor``: variant, origin, isa and path, or error."""
    try:
        found = load()
    except RuntimeError as exc:
        return {"error": str(exc)}
    return {"variant": found.variant, "origin": found.origin, "isa": found.isa, "path": str(found.path)}
