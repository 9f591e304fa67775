"""One session interface over the backends: onnxruntime with its CPU, CUDA and TensorRT execution providers. Every call is checked against the manifest's tensor specs (names, dtypes, ranks, fixed
dims), so a wrong feed fails with one line naming the tensor instead of an opaque backend error.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from megaedge.errors import BundleError, MegaedgeError
from megaedge.runtime.limits import check_threads
from megaedge.runtime.manifest import GraphSpec

log = logging.getLogger("megaedge.runtime.session")

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def resolve_providers(names) -> list[str]:
    """Short names (cpu, cuda, tensorrt) or full ORT provider names -> ORT provider list, CPU always last."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = []
    for name in names or ("cpu",):
        full = PROVIDERS.get(name, name)
        if name not in PROVIDERS and not name.endswith("ExecutionProvider"):
            raise MegaedgeError(f"execution provider {name!r} is not one of {', '.join(PROVIDERS)} (or an "
                                "onnxruntime provider name, e.g. CUDAExecutionProvider)")
        if full not in available:
            raise MegaedgeError(
                f"execution provider {name!r} is not available in this onnxruntime (available: "
                f"{sorted(available)}); for CUDA install onnxruntime-gpu in place of onnxruntime"
            )
        if full not in chosen:
            chosen.append(full)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    if chosen[0] in GPU_PROVIDERS:
        _preload_cuda_libraries(ort)
    return chosen


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_preloaded = False


class GpuGate:
    """Who may touch the GPU while onnxruntime captures a CUDA graph.

    onnxruntime captures in cudaStreamCaptureModeGlobal (it supports CUDA graphs from one thread only): while one
    thread captures, a cudaMalloc or a synchronous copy made by any other thread of the process fails and breaks
    the capture, and the other thread's call silently goes wrong (an empty transcript where several threads shared
    a fixed-KV Transcriber on the GPU). So every megaedge call that does GPU work holds this gate shared, and the
    decode steps that may capture (the first steps over a new set of fixed-KV buffers, runtime/fixed_kv.py) hold it
    alone. A reader-writer lock preferring the writer; never taken again by a thread that holds it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False
        self._waiting = 0  # threads waiting to hold it alone: new shared holders wait behind them

    @contextmanager
    def shared(self, on_gpu: bool = True):
        if not on_gpu:
            yield
            return
        with self._cond:
            while self._alone or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def alone(self):
        with self._cond:
            self._waiting += 1
            try:
                while self._alone or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


gpu_gate = GpuGate()
# onnxruntime's intra-op threads spin-wait for work between operators by default. megaedge runs the decode steps,
# the stem and the tokenizer on the same cores beside the sessions, and edge boxes run other services: spinning
# threads hold those cores at 100 % while doing nothing. Off unless MEGAEDGE_ORT_SPIN=1 (or spin=True) asks for it.
SPIN_ENV = "MEGAEDGE_ORT_SPIN"


def spin_enabled(spin: bool | None = None) -> bool:
    """``spin`` if given, else the MEGAEDGE_ORT_SPIN environment variable (1/true/yes/on), else off."""
    if spin is not None:
        return bool(spin)
    return os.environ.get(SPIN_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _preload_cuda_libraries(ort) -> None:
    """onnxruntime-gpu finds CUDA / cuDNN installed as pip packages (nvidia-*) only through preload_dlls(); a
    system-wide CUDA is found by the loader anyway, so a failure here is not an error."""
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    try:
        ort.preload_dlls()
    except Exception as exc:  # pragma: no cover - depends on the machine's CUDA installation
        log.debug("onnxruntime.preload_dlls() failed: %s", exc)


def check_feed(spec: GraphSpec, feed: dict) -> None:
    expected = spec.input_names
    missing = [n for n in expected if n not in feed]
    extra = [n for n in feed if n not in expected]
    if missing or extra:
        raise BundleError(f"{spec.file}: inputs {sorted(feed)} do not match the graph's {list(expected)} "
                          f"(missing {missing}, unexpected {extra})")
    for tensor in spec.inputs:
        value = feed[tensor.name]
        dtype = getattr(value, "dtype", None)
        shape = tuple(value.shape() if callable(getattr(value, "shape", None)) else value.shape)
        if dtype is not None and not callable(dtype) and str(np.dtype(dtype)) != tensor.dtype:
            raise BundleError(f"{spec.file}: input {tensor.name} has dtype {dtype}, the graph expects {tensor.dtype}")
        if len(shape) != len(tensor.shape):
            raise BundleError(f"{spec.file}: input {tensor.name} has rank {len(shape)} (shape {shape}), "
                              f"the graph expects rank {len(tensor.shape)} {tensor.shape}")
        for got, want in zip(shape, tensor.shape):
            if isinstance(want, int) and want > 0 and got != want:
                raise BundleError(f"{spec.file}: input {tensor.name} has shape {shape}, the graph expects {tensor.shape}")


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool"}


def check_spec_against_graph(spec: GraphSpec, session) -> None:
    """The manifest's description of a graph's inputs (what the runtime shapes its feeds and the native code's
    buffers by) against the graph itself: the same names, dtypes and fixed dimensions, else one line. A manifest
    whose values agree with each other but not with its graphs (hand-edited, or forged and re-signed) is then
    refused at load, not in onnxruntime's error or a native kernel's reshape mid-call."""
    graph = {i.name: i for i in session.get_inputs()}
    names = [t.name for t in spec.inputs]
    if sorted(names) != sorted(graph):
        raise BundleError(f"{spec.file}: the manifest lists inputs {sorted(names)}, the graph has {sorted(graph)}; "
                          "the manifest does not describe this graph: re-export the bundle")
    for tensor in spec.inputs:
        actual = graph[tensor.name]
        dtype = _ORT_TYPES.get(actual.type, actual.type)
        shape = list(actual.shape or [])
        fixed_mismatch = len(shape) != len(tensor.shape) or any(
            isinstance(want, int) and isinstance(got, int) and want != got for want, got in zip(tensor.shape, shape))
        if dtype != tensor.dtype or fixed_mismatch:
            raise BundleError(f"{spec.file}: the manifest says input {tensor.name} is {tensor.dtype} "
                              f"{list(tensor.shape)}, the graph's is {dtype} {shape}; the manifest does not describe "
                              "this graph: re-export the bundle")


class OrtSession:
    """An onnxruntime InferenceSession for one bundle graph."""

    backend = "onnxruntime"

    def __init__(self, path: Path, spec: GraphSpec, providers=("cpu",), threads: int | None = None,
                 prepared: bool = False, profile_prefix: str | None = None, spin: bool | None = None,
                 arena: bool = True):
        import onnxruntime as ort

        self.spec = spec
        self.prepared = prepared
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = arena
        if threads is not None:  # 0 or 100000 is a mistake, not "all cores": refuse it (limits.check_threads)
            options.intra_op_num_threads = check_threads(threads)
        self.spinning = spin_enabled(spin)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        if profile_prefix:  # onnxruntime's per-node trace (chrome://tracing format), written by end_profiling()
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        # A prepared copy (runtime/prepared.py) is already optimized for this machine: optimizing again only costs.
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if prepared
                                            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        # Weights in external data are memory-mapped instead of copied when the platform allows.
        try:
            options.add_session_config_entry("session.use_mmap_for_external_initializers", "1")
        except Exception:  # pragma: no cover - older onnxruntime
            pass
        chosen = resolve_providers(providers)
        self.cuda_graph = False
        if chosen[0] == "CUDAExecutionProvider" and _fixed_kv(spec):
            self.session, self.cuda_graph = _cuda_graph_session(ort, path, spec, options, chosen)
        else:
            self.session = _inference_session(ort, path, options, chosen)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        wanted = chosen[0]
        if wanted in GPU_PROVIDERS and wanted not in self.providers:
            # onnxruntime-gpu lists the GPU providers even where their libraries cannot load and then runs on CPU
            # without a word: a user who asked for the GPU must not get CPU timings silently.
            raise MegaedgeError(
                f"{path.name}: {wanted} was requested but onnxruntime could not start it and fell back to "
                f"{self.providers}; install the CUDA and cuDNN libraries onnxruntime-gpu {ort.__version__} was "
                f"built for (pip install 'onnxruntime-gpu[cuda,cudnn]'), or run with --providers cpu")
        check_spec_against_graph(spec, self.session)

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"

    def run(self, feed: dict, check: bool = True) -> list[np.ndarray]:
        if check:
            check_feed(self.spec, feed)
        with gpu_gate.shared(self.device == "cuda"):
            return self.session.run(None, feed)

    def run_bound(self, feed: dict, check: bool = True) -> list:
        """Run with IO binding: inputs may be OrtValues from a previous call (KV cache stays in backend memory);
        returns OrtValues: the KV outputs (present*) in the session's memory, the others copied to the host inside
        the run (a host read of a GPU value later would be a copy outside the GPU gate)."""
        import onnxruntime as ort

        if check:
            check_feed(self.spec, feed)
        binding = self.session.io_binding()
        for name, value in feed.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, self.device if name.startswith("present") else "cpu")
        with gpu_gate.shared(self.device == "cuda"):
            self.session.run_with_iobinding(binding)
        return binding.get_outputs()


def _inference_session(ort, path: Path, options, providers):
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"{path}: onnxruntime cannot load this graph ({str(exc).splitlines()[0]})") from exc


def _fixed_kv(spec: GraphSpec) -> bool:
    from megaedge.runtime import fixed_kv

    return fixed_kv.SEQLENS_K in spec.input_names


def _cuda_graph_session(ort, path: Path, spec: GraphSpec, options, providers) -> tuple:
    """(session, captures CUDA graphs) for a fixed-KV decoder on CUDA (runtime/fixed_kv.py): opened with
    enable_cuda_graph; where onnxruntime refuses that (a node it would run off the GPU), opened without it and
    said so, since the decode steps still run, only launch-bound."""
    cache = next((t for t in spec.inputs if t.name.startswith("past_key")), None)
    if cache is not None and cache.dtype != "float16":
        raise MegaedgeError(f"{path.name}: this fixed-KV decoder's attention runs in {cache.dtype}, and onnxruntime's "
                            f"CUDA GroupQueryAttention takes float16 only; export with --target cuda --precision "
                            f"fp16, or run this bundle with --providers cpu")
    graphed = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), *providers[1:]]
    try:
        return ort.InferenceSession(str(path), options, providers=graphed), True
    except Exception as exc:  # onnxruntime raises its own exception types
        log.warning("%s: onnxruntime cannot capture CUDA graphs for this graph (%s); decode steps run without them",
                    path.name, str(exc).splitlines()[0])
    return _inference_session(ort, path, options, providers), False


def open_session(path: Path, spec: GraphSpec, providers=("cpu",), threads: int | None = None,
                 prepared: bool = False, profile_prefix: str | None = None, spin: bool | None = None,
                 arena: bool = True) -> OrtSession:
    """Session for one graph file of a bundle (or of its prepared copy). ``threads``: 1 .. limits.max_threads(),
    None for all cores; ``spin``: let idle intra-op threads spin-wait (None: MEGAEDGE_ORT_SPIN, default off);
    ``arena``: onnxruntime's CPU memory pool (RuntimeOptions.memory_arena)."""
    return OrtSession(path, spec, providers, threads, prepared, profile_prefix, spin, arena)
