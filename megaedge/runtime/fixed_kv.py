"""The fixed-KV decoder: a KV cache in preallocated buffers that the graph updates in place, every decode step with
the same shapes and the same addresses (what a CUDA graph needs to be captured once and replayed per token).

A bundle exported with ``--target cuda`` has such a decoder graph (``decoder.kv_cache == "fixed"`` in the
manifest): each attention is onnxruntime's ``com.microsoft.GroupQueryAttention`` with ``past_key`` / ``past_value``
of ``[batch, kv_heads, max_kv_length, head_dim]`` (``[1, ...]`` in graphs exported before the batch axis) bound to
the same buffers as ``present_key`` / ``present_value`` (past_present_share_buffer), plus two inputs of this
module's names:

* ``seqlens_k [batch]`` int32: each row's cache length after this call minus one (GroupQueryAttention's
  convention);
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
capture a graph, later steps replay it; prompts run as ordinary runs (graph id -1). Buffers are leased from a
pool per session and returned when the state goes away, so a captured graph is only ever replayed
over the buffers it was captured with, and the number of graph ids stays bounded. onnxruntime keeps captured
graphs per calling thread, so a buffer set is captured once in every thread that steps it. The first steps over
a set of buffers in a thread (where onnxruntime captures) hold runtime/session.py's GPU gate alone, every other
GPU call holds it shared: a capture breaks if another thread allocates or copies meanwhile.

Many streams: graphs exported with a batch axis (every graph since it had one; ``past_key_i`` of [batch, ...]) take
the steps of several states in one run, each row with its own ``seqlens_k`` (GroupQueryAttention attends each row
over its own cache to its own length), so the weights are read once for all of them. For that a state's buffers
are a slot of a bank, [slots, kv_heads, max_kv_length, head_dim] per cache, bound by address: a state alone binds
its slot as [1, ...], a batch binds a run of adjacent slots as [n, ...]. Slots are leased lowest first, so states
that live together sit together; ``step_batch`` (called by runtime/batching.py's ``StepBatcher``, which gathers
the steps of concurrent threads) runs each run of adjacent slots with one LoRA gate as one batch and anything else
apart. On this project's CPUs each row's logits have been its solo step's bits (tested on the fixture's graphs);
elsewhere, GPUs included, a batch's products may round differently from one row's. Batched runs use no CUDA graph
(their shapes vary).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import mmap
import threading
import weakref

import numpy as np

from megaedge.errors import ContextLengthError, MegaedgeError
from megaedge.runtime.batching import step_ready
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
# Decode steps of this many states at most in one run of a batched graph (the graph's batch axis, ``step_batch``).
MAX_BATCH = 16
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


def bank_slots(past_shape, batch_steps: int) -> int:
    """States per KV bank for a decoder graph whose past buffers have ``past_shape``: ``batch_steps`` (1-MAX_BATCH)
    where the batch axis is free, 1 for graphs exported before it had one (their buffers hold one state)."""
    return max(1, min(int(batch_steps), MAX_BATCH)) if not isinstance(past_shape[0], int) else 1


def next_bank(held: int, bank_slots: int, full: bool) -> int:
    """The slots of the next bank a runner allocates when it holds ``held`` slots. ``full`` (the CPU's, where
    untouched pages cost nothing): every bank has ``bank_slots``; else (a GPU, which allocates a bank whole) banks
    double what is held (1, 1, 2, 4, 8, then ``bank_slots`` each), so one stream holds one slot and n streams at
    most 2n."""
    return bank_slots if full else max(1, min(held, bank_slots))


def slots_for(streams: int, bank_slots: int, device: str) -> int:
    """KV slots a runner on ``device`` holds once ``streams`` states are live at once (whole banks, ``next_bank``)."""
    held = 0
    while held < streams:
        held += next_bank(held, bank_slots, device == "cpu")
    return held


class _Bank:
    """The KV buffers of ``slots`` states side by side: per cache one [slots, kv_heads, max_kv_length, head_dim]
    buffer, so a batched step binds a contiguous run of slots as one [n, ...] tensor (``FixedKVRunner.step_batch``).
    On the CPU the zeros are the allocator's untouched pages: a slot's memory is committed as its positions are
    written, so a bank of eight costs what its states use. On a GPU the whole bank is allocated at once, so banks
    there grow with the states (``next_bank``)."""

    def __init__(self, runner: FixedKVRunner, slots: int, number: int):
        import onnxruntime as ort

        dec = runner.decoder
        self.slots, self.device, self.number = slots, runner.device, number  # number: the runner's n-th bank
        self.shape = (int(dec["kv_heads"]), int(dec["max_kv_length"]), int(dec["head_dim"]))
        self.dtype = np.dtype(dec["kv_dtype"])
        self.slot_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.past_names, self.present_names = dec["past_names"], dec["present_names"]
        # Zeros, not uninitialized memory: positions past the length are never attended, but a garbage NaN must not
        # even be possible there. On the CPU the buffers are anonymous maps (zero pages, committed when written,
        # handed back when a slot is released: ``forget``), viewed as arrays whose addresses the bindings take.
        size = slots * self.slot_bytes
        if self.device == "cpu":
            # private: released pages then read as zeros (a shared map would keep them)
            self._maps = [mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
                          for _ in self.past_names]
            self._arrays = [np.frombuffer(m, self.dtype).reshape(slots, *self.shape) for m in self._maps]
            self._pointers = [a.ctypes.data for a in self._arrays]
        else:
            self._maps = None
            self._values = [ort.OrtValue.ortvalue_from_numpy(np.zeros((slots, *self.shape), self.dtype),
                                                             self.device, 0) for _ in self.past_names]
            self._arrays = None
            self._pointers = [v.data_ptr() for v in self._values]

    def bind(self, binding, first: int, count: int) -> None:
        """Slots [first, first + count) as every past input and, the same memory, its present output."""
        if not (0 <= first and count >= 1 and first + count <= self.slots):
            raise MegaedgeError(f"fixed-KV bank: slots {first}-{first + count - 1} of {self.slots}")
        shape = [count, *self.shape]
        for past, present, pointer in zip(self.past_names, self.present_names, self._pointers):
            address = pointer + first * self.slot_bytes
            binding.bind_input(past, self.device, 0, self.dtype.type, shape, address)
            binding.bind_output(present, self.device, 0, self.dtype.type, shape, address)

    def forget(self, slot: int) -> None:
        """Hand a released CPU slot's pages back to the system (they read as zeros again), so a long-lived process
        holds the memory of the states it has now, not of the most it ever had. A no-op on a GPU."""
        if self._maps is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = -(-slot * self.slot_bytes // page) * page  # whole pages inside the slot only
        end = (slot + 1) * self.slot_bytes // page * page
        if end > start:
            for m in self._maps:
                m.madvise(mmap.MADV_DONTNEED, start, end - start)

    def read(self, slot: int, cache: int) -> np.ndarray:
        """A copy of one slot's cache ``cache`` [1, kv_heads, max_kv_length, head_dim] (tests, inspection)."""
        if self._arrays is not None:
            return self._arrays[cache][slot:slot + 1].copy()
        with gpu_gate.shared():  # a device-to-host copy
            return self._values[cache].numpy()[slot:slot + 1].copy()


class _Buffers:
    """One state's slot of a bank, its small step inputs and the step binding over them (a CUDA graph, once
    captured, holds their addresses)."""

    def __init__(self, runner: FixedKVRunner, graph_id: int, bank: _Bank, slot: int):
        import onnxruntime as ort

        device, dec = runner.device, runner.decoder
        self.bank, self.slot = bank, slot
        put = lambda array: ort.OrtValue.ortvalue_from_numpy(array, device, 0)  # noqa: E731
        self.ids = put(np.zeros((1, 1), np.int64))
        self.positions = put(np.zeros((1, 1), np.int64)) if runner.positions else None  # older graphs only
        self.seqlens = put(np.zeros(1, np.int32))
        # Read on the host by the kernel: a CPU value whatever the provider.
        self.total = ort.OrtValue.ortvalue_from_numpy(np.array(dec["max_kv_length"], np.int32))
        self.logits_at = put(np.zeros(1, np.int64))
        self.audio = put(np.zeros((0, dec["hidden_size"]), np.dtype(dec["kv_dtype"])))
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
                            *((("lora_gate", self.gate),) if self.gate else ())):
            binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output("logits", self.logits)
        bank.bind(binding, slot, 1)
        self.step_binding = binding

    def sort_key(self) -> tuple[int, int]:
        return self.bank.number, self.slot


class FixedKVRunner:
    """Per decoder session (shared, read-only but for its slot pool): geometry, the session, and slots of KV banks
    leased to states. ``session`` is an onnxruntime InferenceSession; ``cuda_graph``: the session was opened with
    enable_cuda_graph (its runs are serialised: a captured graph replays on the session's one stream).
    ``batch_steps``: states per KV bank, the most one batched step takes (``bank_slots``; 1 where the graph has no
    batch axis)."""

    def __init__(self, session, decoder: dict, routed: bool, gate_dtype, device: str = "cpu",
                 cuda_graph: bool = False, batch_steps: int = 1, full_banks: bool | None = None):
        import onnxruntime as ort

        self.session, self.decoder, self.routed = session, decoder, routed
        self.gate_dtype, self.device, self.cuda_graph = np.dtype(gate_dtype), device, cuda_graph
        self.max_length = int(decoder["max_kv_length"])
        inputs = {i.name: i for i in session.get_inputs()}
        self.positions = POSITION_IDS in inputs  # an older graph's RoPE input
        self.bank_slots = bank_slots(inputs[decoder["past_names"][0]].shape, batch_steps)
        self.full_banks = device == "cpu" if full_banks is None else bool(full_banks)  # next_bank; a benchmark
        self.prompt_options = ort.RunOptions()
        if cuda_graph:
            self.prompt_options.add_run_config_entry(GRAPH_RUN_KEY, "-1")
        self.run_lock = threading.Lock() if cuda_graph else None
        self._grow = threading.Lock()  # leases, one at a time; the pool below is only touched under it
        # Released slots arrive here from finalizers, on any thread and perhaps inside a lease on the same thread:
        # deque.append takes no lock, so a release can never wait for one.
        self._returned: collections.deque = collections.deque()
        self._banks: list[_Bank] = []
        self._free: list[_Buffers] = []  # slots of departed states, lowest first when leased
        self._used = 0  # slots handed out of the newest bank
        self._graphs = 0
        # step runs per graph id made by the calling thread: thread-local, as onnxruntime's captured graphs are (a
        # thread that ends takes its graphs and its counts along; a new thread that reuses its id starts at 0)
        self._thread_runs = threading.local()

    def lease(self) -> _Buffers:
        """A slot for a new state: the lowest free one (states that step together sit side by side, so their
        steps run as one batch), else the next of the newest bank, else the first of a new bank. On CUDA each slot
        gets a graph id while there are ids left (MAX_GRAPHS); later ones step without a graph."""
        with self._grow:
            while self._returned:
                self._free.append(self._returned.popleft())
            if self._free:
                best = min(self._free, key=_Buffers.sort_key)
                self._free.remove(best)
                return best
            if not self._banks or self._used == self._banks[-1].slots:
                size = next_bank(sum(b.slots for b in self._banks), self.bank_slots, self.full_banks)
                with self.gate_for():  # device allocations and copies
                    self._banks.append(_Bank(self, size, len(self._banks)))
                self._used = 0
            bank, slot = self._banks[-1], self._used
            graph_id = self._graphs + 1 if self.cuda_graph and self._graphs < MAX_GRAPHS else -1  # 0: reserved
            if self.cuda_graph and graph_id < 0:
                log.warning("more than %d fixed-KV decoder states at once: this one steps without a CUDA graph",
                            MAX_GRAPHS)
            with self.gate_for():
                buffers = _Buffers(self, graph_id, bank, slot)
            self._used += 1  # only now: a slot whose buffers failed is not lost
            self._graphs += graph_id > 0
            return buffers

    def release(self, buffers: _Buffers) -> None:
        buffers.bank.forget(buffers.slot)
        self._returned.append(buffers)

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

    def step_batch(self, states: list[FixedKVState], tokens: list[int], gates: list[float | None],
                   runs: list[int] | None = None) -> np.ndarray:
        """One step of each state; logits [len(states), vocab]. States in adjacent slots of one bank with the
        same LoRA gate run as one batch (one read of the weights; each row attends over its own cache at its own
        length); the rest in further runs. Batches run without a CUDA graph (their shapes vary), and so does a lone
        state stepped from a thread other than its own (onnxruntime keeps captured graphs per thread: stepping it
        here would capture its graph again, with every other GPU call held off meanwhile). ``runs``: gets the
        size of each run made."""
        if not (len(states) == len(tokens) == len(gates)) or len({id(s) for s in states}) != len(states):
            raise MegaedgeError(f"fixed-KV batch: {len(states)} distinct states for {len(tokens)} tokens")
        if any(s.runner is not self for s in states):
            raise MegaedgeError("fixed-KV batch: states of another decoder session")
        for s in states:  # all before any run: a call that raises has stepped nobody
            s._room(1)
        logits: list[np.ndarray | None] = [None] * len(states)
        order = sorted(range(len(states)), key=lambda i: states[i].buffers.sort_key())
        run: list[int] = []
        for i in order + [None]:
            if run and (i is None or not self._extends(states[run[-1]], states[i], gates[run[-1]], gates[i])):
                if runs is not None:
                    runs.append(len(run))
                lone = states[run[0]]
                if len(run) == 1 and (not self.cuda_graph or lone.stepper == threading.get_ident()):
                    logits[run[0]] = lone.step_alone(tokens[run[0]], gates[run[0]])  # its captured graph
                else:
                    rows = self._run_batch([states[j] for j in run], [tokens[j] for j in run], gates[run[0]])
                    for j, row in zip(run, rows):
                        logits[j] = row
                run = []
            if i is not None:
                run.append(i)
        return np.stack(logits)

    @staticmethod
    def _extends(last: FixedKVState, state: FixedKVState, last_gate, gate) -> bool:
        a, b = last.buffers, state.buffers
        same_gate = (1.0 if last_gate is None else float(last_gate)) == (1.0 if gate is None else float(gate))
        return a.bank is b.bank and b.slot == a.slot + 1 and same_gate

    def _run_batch(self, states: list[FixedKVState], tokens: list[int], gate: float | None) -> np.ndarray:
        for s in states:
            s._room(1)
        lengths = np.array([s.length for s in states], np.int32)
        n = len(states)
        binding = self.session.io_binding()
        cpu = lambda name, array: binding.bind_cpu_input(name, np.ascontiguousarray(array))  # noqa: E731
        cpu("input_ids", np.asarray(tokens, np.int64)[:, None])
        cpu("audio_features", np.zeros((0, self.decoder["hidden_size"]), self.decoder["kv_dtype"]))
        cpu("logits_at", np.arange(n, dtype=np.int64))  # one row per state: rows 0..n-1 of the n x 1
        if self.positions:
            cpu(POSITION_IDS, lengths.astype(np.int64)[:, None])
        cpu(SEQLENS_K, lengths)
        binding.bind_ortvalue_input(TOTAL_LENGTH, states[0].buffers.total)
        if self.routed:
            cpu("lora_gate", np.array([1.0 if gate is None else float(gate)], self.gate_dtype))
        binding.bind_output("logits", "cpu")
        first = states[0].buffers
        first.bank.bind(binding, first.slot, n)
        with self.gate_for():
            self.run(binding, self.prompt_options)
        for s in states:
            s.length += 1
        return binding.get_outputs()[0].numpy()


_runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_runners_lock = threading.Lock()


def runner_for(transcriber) -> FixedKVRunner:
    """The runner of ``transcriber``'s decoder session, made once (keyed by the session object)."""
    session = transcriber.sessions["decoder"]
    with _runners_lock:
        runner = _runners.get(session)
        if runner is None:
            info = transcriber.manifest
            options = getattr(transcriber, "options", None)
            runner = FixedKVRunner(session.session, info.decoder, info.routed, transcriber.float_dtype,
                                   session.device, getattr(session, "cuda_graph", False),
                                   options.batch_steps if options is not None else 1)
            _runners[session] = runner
    return runner


class FixedKVState:
    """runtime/decoding.py's decoder state over a fixed-KV decoder graph (module docstring)."""

    def __init__(self, runner: FixedKVRunner, batcher=None):
        self.runner = runner
        self.length = 0
        self.buffers = runner.lease()
        weakref.finalize(self, runner.release, self.buffers)
        # runtime/batching.py: steps of concurrent states in one run, where the graph has a batch axis
        self.batcher = batcher if runner.bank_slots > 1 else None
        self.stepper = threading.get_ident()

    @classmethod
    def of(cls, transcriber) -> FixedKVState:
        return cls(runner_for(transcriber), getattr(transcriber, "batcher", None))

    @property
    def batch_key(self):
        """States whose steps may share a run (runtime/batching.py): those of one decoder session."""
        return self.runner

    def step_many(self, states: list[FixedKVState], tokens: list[int], gates: list[float | None]
                  ) -> tuple[list, list]:
        """runtime/batching.py's call: (each state's logits, or the error of a state that cannot step (its buffer
        full), which then fails alone; the steps of each onnxruntime run made)."""
        return step_ready(states, tokens, gates, lambda s: s._room(1), self.runner.step_batch)

    def stepping(self):
        """Around a run of steps: lets the batcher wait for this state's next step."""
        return self.batcher.stepping() if self.batcher is not None else contextlib.nullcontext()

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    def _room(self, rows: int) -> None:
        if self.length + rows > self.runner.max_length:
            raise ContextLengthError(
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
        binding.bind_output("logits", "cpu")  # first: get_outputs() lists in binding order; copied in the run
        b.bank.bind(binding, b.slot, 1)
        with runner.gate_for():
            self._set_lora_gate(gate)
            runner.run(binding, runner.prompt_options)
        self.length = total
        logits = binding.get_outputs()[0].numpy()
        return logits[len(logits) - logit_rows:]

    def step(self, token: int, gate: float | None) -> np.ndarray:
        if self.batcher is not None:
            self.stepper = threading.get_ident()  # the thread whose captured graph a lone step may replay
            return self.batcher.step(self, token, gate)
        return self.step_alone(token, gate)

    def step_alone(self, token: int, gate: float | None) -> np.ndarray:
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
