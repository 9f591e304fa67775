"""The fixed-KV decoder: a KV cache in preallocated buffers that the graph updates in place, every decode step with
the same shapes and the same addresses (what a CUDA graph needs to be captured once and replayed per token).

A bundle exported with ``--target cuda`` has such a decoder graph (``decoder.kv_cache == "fixed"`` in the
manifest): each attention is onnxruntime's ``com.microsoft.GroupQueryAttention`` with ``past_key`` / ``past_value``
of ``[1, kv_heads, max_kv_length, head_dim]`` bound to the same buffers as ``present_key`` / ``present_value``
(past_present_share_buffer), plus two inputs of this module's names:

* ``seqlens_k [1]`` int32: the cache length after this call minus one (GroupQueryAttention's convention);
* ``total_sequence_length []`` int32, read on the host: the exact total for a prompt (the kernel tells a first
  prompt, S == total, from a continued one), ``max_kv_length`` for a step, so the value captured into a CUDA graph
  stays right at every replay while ``seqlens_k`` (device memory, updated in place) carries the real length.

The rotary embedding is the attention node's own: each new row's position is the cache slot it is written to,
which is what this module always asks for (after a rollback the next rows take the freed slots and positions).
Graphs whose heads the node cannot rotate (sizes not a multiple of 16), and all fixed-KV graphs exported before
it could, apply RoPE in the graph from a third input, ``position_ids [1, S]`` int64: it is bound where the graph
has it, with the same positions.

``FixedKVState`` implements runtime/decoding.py's interface over it; ``rollback`` only moves the length (the next
call overwrites the positions from there). Steps go through one IO binding built once per state: the step inputs
are small device buffers updated in place, the logits output a preallocated buffer. On CUDA the decoder session is
opened with ``enable_cuda_graph`` (runtime/session.py) and every state's buffers carry a graph id: its first steps
capture a graph, later steps replay it; prompts run as ordinary runs (graph id -1). Buffers with a graph id are
leased from a pool per session and returned when the state goes away, so a captured graph is only ever replayed
over the buffers it was captured with, and the number of graph ids stays bounded. onnxruntime keeps captured
graphs per calling thread, so a buffer set is captured once in every thread that steps it. The first steps over
a set of buffers in a thread (where onnxruntime captures) hold runtime/session.py's GPU gate alone, every other
GPU call holds it shared: a capture breaks if another thread allocates or copies meanwhile.
"""

from __future__ import annotations

import logging
import threading
import weakref

import numpy as np

from megaedge.errors import MegaedgeError
from megaedge.runtime.session import gpu_gate

log = logging.getLogger("megaedge.runtime.fixed_kv")

SEQLENS_K = "seqlens_k"
TOTAL_LENGTH = "total_sequence_length"
FIXED_INPUTS = (SEQLENS_K, TOTAL_LENGTH)
POSITION_IDS = "position_ids"  # older fixed-KV graphs: RoPE in the graph from these positions
KV_CACHE_KINDS = ("growing", "fixed")
# The buffer length a manifest may name: at least a short prompt plus a few tokens, at most what the 30 s segments
# and streams need many times over (1.7B fp16: 112 KiB per position, 3.5 GiB at the top of the range).
MAX_KV_RANGE = (64, 32768)
DEFAULT_MAX_KV = 2048  # a 30 s segment's ~420 prompt rows + context + 256 new tokens, with room for a stream
# CUDA graphs per decoder session: each is captured over one state's buffers (a full KV cache); states beyond this
# many at once run their steps without a graph (same results, launch-bound).
MAX_GRAPHS = 8
# onnxruntime captures a graph id's graph on one of its first runs (after a warm-up run that makes the
# allocations), and keeps captured graphs per calling thread (the CUDA provider's per-thread context): a buffer
# set stepped from a thread that has not stepped it before is captured again there. So steps over a buffer set
# hold the GPU gate alone until this many have run from the calling thread.
CAPTURE_RUNS = 3
GRAPH_RUN_KEY = "gpu_graph_id"  # onnxruntime run option: which captured graph a run uses; -1 none


def is_fixed(decoder: dict) -> bool:
    return decoder.get("kv_cache") == "fixed"


def kv_bytes(decoder: dict) -> int:
    """Bytes of one state's KV buffers (key and value of every layer at max_kv_length)."""
    return (len(decoder["past_names"]) * decoder["kv_heads"] * decoder["head_dim"] * decoder["max_kv_length"]
            * np.dtype(decoder["kv_dtype"]).itemsize)


class _Buffers:
    """One state's device buffers and the step binding over them (a CUDA graph, once captured, holds their
    addresses)."""

    def __init__(self, runner: FixedKVRunner, graph_id: int):
        import onnxruntime as ort

        device, dec = runner.device, runner.decoder
        shape = (1, dec["kv_heads"], dec["max_kv_length"], dec["head_dim"])
        kv_dtype = np.dtype(dec["kv_dtype"])
        put = lambda array: ort.OrtValue.ortvalue_from_numpy(array, device, 0)  # noqa: E731
        # Zeros, not uninitialized memory: positions past the length are never attended, but a garbage NaN must not
        # even be possible there.
        self.kv = [put(np.zeros(shape, kv_dtype)) for _ in dec["past_names"]]
        self.ids = put(np.zeros((1, 1), np.int64))
        self.positions = put(np.zeros((1, 1), np.int64)) if runner.positions else None  # older graphs only
        self.seqlens = put(np.zeros(1, np.int32))
        # Read on the host by the kernel: a CPU value whatever the provider.
        self.total = ort.OrtValue.ortvalue_from_numpy(np.array(dec["max_kv_length"], np.int32))
        self.logits_at = put(np.zeros(1, np.int64))
        self.audio = put(np.zeros((0, dec["hidden_size"]), kv_dtype))
        self.gate = put(np.ones(1, runner.gate_dtype)) if runner.routed else None
        self.gate_value = 1.0
        self.logits = put(np.zeros((1, dec["vocab_size"]), np.float32))
        self.graph_id = graph_id
        self.step_options = ort.RunOptions()
        self.step_options.add_run_config_entry(GRAPH_RUN_KEY, str(graph_id))
        binding = runner.session.io_binding()
        positions = ((POSITION_IDS, self.positions),) if self.positions is not None else ()
        for name, value in (("input_ids", self.ids), ("audio_features", self.audio), ("logits_at", self.logits_at),
                            *positions, (SEQLENS_K, self.seqlens), (TOTAL_LENGTH, self.total),
                            *zip(dec["past_names"], self.kv), *((("lora_gate", self.gate),) if self.gate else ())):
            binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output("logits", self.logits)
        for name, value in zip(dec["present_names"], self.kv):
            binding.bind_ortvalue_output(name, value)  # the same buffer as the past: updated in place
        self.step_binding = binding


class FixedKVRunner:
    """Per decoder session (shared, read-only but for its buffer pool): geometry, the session, and buffer sets
    leased to states. ``session`` is an onnxruntime InferenceSession; ``cuda_graph``: the session was opened with
    enable_cuda_graph (its runs are serialised: a captured graph replays on the session's one stream)."""

    def __init__(self, session, decoder: dict, routed: bool, gate_dtype, device: str = "cpu",
                 cuda_graph: bool = False):
        import onnxruntime as ort

        self.session, self.decoder, self.routed = session, decoder, routed
        self.gate_dtype, self.device, self.cuda_graph = np.dtype(gate_dtype), device, cuda_graph
        self.max_length = int(decoder["max_kv_length"])
        self.positions = POSITION_IDS in {i.name for i in session.get_inputs()}  # an older graph's RoPE input
        self.prompt_options = ort.RunOptions()
        if cuda_graph:
            self.prompt_options.add_run_config_entry(GRAPH_RUN_KEY, "-1")
        self._lock = threading.Lock()  # the pool
        self.run_lock = threading.Lock() if cuda_graph else None
        self._free: list[_Buffers] = []
        self._graphs = 0
        # step runs per graph id made by the calling thread: thread-local, as onnxruntime's captured graphs are (a
        # thread that ends takes its graphs and its counts along; a new thread that reuses its id starts at 0)
        self._thread_runs = threading.local()

    def lease(self) -> _Buffers:
        """Buffers for a new state: a free pooled set (its graph already captured), a new pooled set with the next
        graph id, or beyond MAX_GRAPHS an unpooled set that runs without a graph."""
        if not self.cuda_graph:
            return self._new(-1)
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._graphs < MAX_GRAPHS:
                self._graphs += 1  # ids from 1: onnxruntime reserves 0
                graph_id = self._graphs
            else:
                graph_id = -1
        if graph_id < 0:
            log.warning("more than %d fixed-KV decoder states at once: this one steps without a CUDA graph",
                        MAX_GRAPHS)
        return self._new(graph_id)

    def _new(self, graph_id: int) -> _Buffers:
        with self.gate_for():  # device allocations and copies
            return _Buffers(self, graph_id)

    def release(self, buffers: _Buffers) -> None:
        if buffers.graph_id > 0:
            with self._lock:
                self._free.append(buffers)

    def run(self, binding, options) -> None:
        if self.run_lock is None:
            self.session.run_with_iobinding(binding, options)
            return
        with self.run_lock:
            self.session.run_with_iobinding(binding, options)

    def step_runs(self, graph_id: int) -> int:
        """Steps the calling thread has run over graph id ``graph_id``'s buffers."""
        return getattr(self._thread_runs, "counts", {}).get(graph_id, 0)

    def count_step(self, graph_id: int) -> None:
        counts = self._thread_runs.__dict__.setdefault("counts", {})
        counts[graph_id] = counts.get(graph_id, 0) + 1

    def gate_for(self, buffers: _Buffers | None = None):
        """The GPU gate for a prompt run (None) or a step over ``buffers``: alone while that step may capture."""
        if self.device != "cuda":
            return gpu_gate.shared(False)
        if (buffers is not None and self.cuda_graph and buffers.graph_id > 0
                and self.step_runs(buffers.graph_id) < CAPTURE_RUNS):
            return gpu_gate.alone()
        return gpu_gate.shared()


_runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_runners_lock = threading.Lock()


def runner_for(transcriber) -> FixedKVRunner:
    """The runner of ``transcriber``'s decoder session, made once (keyed by the session object)."""
    session = transcriber.sessions["decoder"]
    with _runners_lock:
        runner = _runners.get(session)
        if runner is None:
            info = transcriber.manifest
            runner = FixedKVRunner(session.session, info.decoder, info.routed, transcriber.float_dtype,
                                   session.device, getattr(session, "cuda_graph", False))
            _runners[session] = runner
    return runner


class FixedKVState:
    """runtime/decoding.py's decoder state over a fixed-KV decoder graph (module docstring)."""

    def __init__(self, runner: FixedKVRunner):
        self.runner = runner
        self.length = 0
        self.buffers = runner.lease()
        weakref.finalize(self, runner.release, self.buffers)

    @classmethod
    def of(cls, transcriber) -> FixedKVState:
        return cls(runner_for(transcriber))

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    def _room(self, rows: int) -> None:
        if self.length + rows > self.runner.max_length:
            raise MegaedgeError(
                f"decoder: {self.length} cached + {rows} new positions exceed this bundle's fixed KV buffer of "
                f"{self.runner.max_length} (decoder.max_kv_length); shorten the segments or the context, or "
                f"re-export with a larger --max-kv-length")

    def _set_lora_gate(self, gate: float | None) -> None:  # under the GPU gate: a host-to-device copy
        value = 1.0 if gate is None else float(gate)
        b = self.buffers
        if b.gate is not None and value != b.gate_value:
            b.gate.update_inplace(np.array([value], self.runner.gate_dtype))
            b.gate_value = value

    def extend(self, ids: list[int], audio, gate: float | None, logit_rows: int = 1) -> np.ndarray:
        import onnxruntime as ort

        if not 0 <= logit_rows <= len(ids) or not ids:
            raise MegaedgeError(f"decoder: logits of {logit_rows} rows asked of {len(ids)} rows")
        rows = len(ids)
        self._room(rows)
        runner, b = self.runner, self.buffers
        dec = runner.decoder
        total = self.length + rows
        if audio is None:
            audio = np.zeros((0, dec["hidden_size"]), dec["kv_dtype"])
        binding = runner.session.io_binding()
        cpu = lambda name, array: binding.bind_cpu_input(name, np.ascontiguousarray(array))  # noqa: E731
        cpu("input_ids", np.asarray([ids], np.int64))
        cpu("audio_features", np.asarray(audio, dec["kv_dtype"]))
        cpu("logits_at", np.arange(rows - max(logit_rows, 1), rows, dtype=np.int64))  # at least one row
        if runner.positions:
            cpu(POSITION_IDS, np.arange(self.length, total, dtype=np.int64)[None])
        cpu(SEQLENS_K, np.array([total - 1], np.int32))
        binding.bind_ortvalue_input(TOTAL_LENGTH, ort.OrtValue.ortvalue_from_numpy(np.array(total, np.int32)))
        if b.gate is not None:
            binding.bind_ortvalue_input("lora_gate", b.gate)
        for name, value in zip(dec["past_names"], b.kv):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # first: get_outputs() lists in binding order; copied in the run
        for name, value in zip(dec["present_names"], b.kv):
            binding.bind_ortvalue_output(name, value)
        with runner.gate_for():
            self._set_lora_gate(gate)
            runner.run(binding, runner.prompt_options)
        self.length = total
        logits = binding.get_outputs()[0].numpy()
        return logits[len(logits) - logit_rows:]

    def step(self, token: int, gate: float | None) -> np.ndarray:
        self._room(1)
        b = self.buffers
        with self.runner.gate_for(b):
            self._set_lora_gate(gate)
            b.ids.update_inplace(np.array([[token]], np.int64))
            if self.runner.positions:
                b.positions.update_inplace(np.array([[self.length]], np.int64))
            b.seqlens.update_inplace(np.array([self.length], np.int32))
            self.runner.run(b.step_binding, b.step_options)
            self.runner.count_step(b.graph_id)
            logits = b.logits.numpy()[0].copy()  # the buffer is the next step's output
        self.length += 1
        return logits

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise MegaedgeError(f"decoder: cannot roll back to {length} of {self.length} positions")
        self.length = length  # positions from here on are overwritten before any call attends them
