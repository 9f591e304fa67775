"""Decode steps of concurrent streams and calls, run as one batch over one read of the weights.

Every stream and ``transcribe`` call decodes in its own thread with its own decoder state (runtime/decoding.py).
With a ``StepBatcher`` their decode steps meet here: the first caller to arrive becomes the leader, waits a
moment for the others that are decoding right now, and runs all the waiting steps as one call: the native
kernels' (native_decode.step_batch: every weight block read once for all of them, attention per sequence over its
own cache; each sequence gets exactly the bits it gets alone, so batching changes no transcript, only the time) or
a fixed-KV decoder graph's batch axis (fixed_kv.FixedKVRunner.step_batch: one run per group of states with one
LoRA gate; on this project's CPUs each row has been its solo step's bits on the fixture's graphs, but onnxruntime's
products over a batch may round differently from one row's elsewhere, GPUs included). A decoder takes part through
``batch_key`` (steps of equal keys may share a call) and ``step_many(decoders, tokens, gates)``, which returns
(each decoder's logits or the error of one that cannot step, which fails alone; the sizes of the calls it made:
a fixed-KV group splits where its slots are not adjacent). ``batches`` and ``on_batch`` count those calls.

Why a leader and not a worker thread: a lone caller runs its own step at once, with no hand-off; a batch costs
the followers one wake-up each. The wait is bounded by ``gather_seconds`` and skipped as soon as every decoder
that is between steps has arrived (``stepping`` counts them), so a single stream never waits for anybody.

Interrupts stay in their thread. Python raises Ctrl-C's KeyboardInterrupt in the main thread, so the main thread
never leads a batch of other threads' steps (its own steps run alone): a batch it led would fail for every
thread in it, mid-step. A caller interrupted while waiting withdraws its step, or, when a leader already runs
it, waits for that step to end (its decoder must not be touched while the kernel writes to it) and then raises;
an interrupted leader answers every step it took (with an error) and gives the lead back. (A signal landing inside
``threading.Condition``'s own methods can still break its lock: a storm of signals, not a person's Ctrl-C.)
Exceptions of a step are handed to the callers in its call.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

import numpy as np

from megaedge.errors import MegaedgeError
from megaedge.runtime import kernels

log = logging.getLogger("megaedge.runtime.batching")

# A decode step of the 1.7B model takes tens of milliseconds: a wait of 2 ms for a peer costs a few per cent of one
# step and saves a whole weight read when the peer comes.
GATHER_SECONDS = 0.002


class _Request:
    __slots__ = ("decoder", "token", "gate", "logits", "error", "done", "taken")

    def __init__(self, decoder, token: int, gate: float | None):
        self.decoder, self.token, self.gate = decoder, token, gate
        self.logits = self.error = None
        self.taken = False  # a leader took it into a batch: it will be answered
        self.done = threading.Event()


class StepBatcher:
    """Batches the decode steps of concurrent threads (see the module docstring). ``max_batch``:
    1-16 steps per kernel call (1: every step alone)."""

    def __init__(self, max_batch: int = 8, gather_seconds: float = GATHER_SECONDS):
        if not 1 <= int(max_batch) <= kernels.MAX_BATCH:
            raise MegaedgeError(f"max_batch {max_batch} is outside 1-{kernels.MAX_BATCH}; e.g. 8")
        if not 0 <= gather_seconds <= 0.1:
            raise MegaedgeError(f"gather_seconds {gather_seconds} is outside 0-0.1 s; e.g. {GATHER_SECONDS}")
        self.max_batch, self.gather_seconds = int(max_batch), float(gather_seconds)
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._leader = False  # a thread is gathering or running a batch
        self._stepping = 0  # decoders inside a greedy loop: the ones a batch may wait for
        self.batches: dict[int, int] = {}  # steps per call -> calls made (what batching achieved)
        self.on_batch = None  # called with each call's size (a server's metrics), from the leading thread

    @contextmanager
    def stepping(self):
        """Around a decoder's run of steps: while inside, a leader may wait for its next step."""
        with self._cond:
            self._stepping += 1
        try:
            yield
        finally:
            with self._cond:
                self._stepping -= 1
                self._cond.notify_all()

    def step(self, decoder, token: int, gate: float | None = None) -> np.ndarray:
        """``decoder``'s step of ``token``, possibly in one call with other threads' steps (of either route of a
        routed bundle: each row carries its own gate)."""
        if self.max_batch == 1:
            return _value(decoder.step_many([decoder], [token], [gate])[0][0])
        request = _Request(decoder, token, gate)
        alone = threading.current_thread() is threading.main_thread()  # where KeyboardInterrupt lands
        # An interrupt may land between any two calls: every state it can leave is undone below. Leadership is
        # taken inside the try (one chained store: no signal check between the flag and ``led``), and whatever
        # the leader took is answered, by its result or an error, before leadership is given back.
        try:
            with self._cond:
                self._pending.append(request)
                self._cond.notify_all()
            while True:
                led, batch = False, []
                try:
                    with self._cond:
                        while not request.done.is_set() and self._leader:
                            self._cond.wait()
                        if request.done.is_set():
                            return self._result(request)
                        self._leader = led = True  # no leader and this step unserved: lead the next batch
                        batch = [request] if alone else self._gather()
                        for taken in batch:
                            taken.taken = True
                        self._pending = [r for r in self._pending if not r.taken]
                    self._run(batch)
                except BaseException as exc:
                    self._fail(batch, request, exc)
                    raise
                finally:
                    if led:
                        with self._cond:
                            self._leader = False
                            self._cond.notify_all()
        except BaseException:
            self._withdraw(request)
            raise

    def _gather(self) -> list[_Request]:
        """The next batch (called holding the lock): waits up to gather_seconds for the decoders between steps."""
        deadline = time.perf_counter() + self.gather_seconds
        while len(self._pending) < min(self.max_batch, max(self._stepping, 1)):
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._cond.wait(left)
        return self._pending[: self.max_batch]

    def _withdraw(self, request: _Request) -> None:
        """After an interrupt: the step leaves the queue, or, taken by a leader, is waited for (the kernel is
        writing its decoder); a step that never reached the queue needs nothing."""
        with self._cond:
            if request in self._pending:
                self._pending.remove(request)
                return
        if request.taken:
            request.done.wait()

    @staticmethod
    def _fail(batch: list[_Request], own: _Request, exc: BaseException) -> None:
        """A leader's interrupt: it raises it itself; the others it took get an error instead of waiting forever."""
        for r in batch:
            if not r.done.is_set():
                r.error = exc if r is own else MegaedgeError(f"decode step stopped by {type(exc).__name__} in "
                                                             "the thread that ran its batch")
                r.done.set()

    def _run(self, batch: list[_Request]) -> None:
        groups: dict[int, list[_Request]] = {}
        for request in batch:  # decoders of different weights (two transcribers) cannot share a call
            groups.setdefault(id(request.decoder.batch_key), []).append(request)
        for group in groups.values():
            self._run_group(group)

    def _run_group(self, group: list[_Request]) -> None:
        try:
            logits, calls = group[0].decoder.step_many([r.decoder for r in group], [r.token for r in group],
                                                       [r.gate for r in group])
        except Exception as exc:  # noqa: BLE001 - handed to each waiting caller
            for r in group:
                r.error = exc
                r.done.set()
            return
        for r, row in zip(group, logits):  # a row may be the error of a decoder that could not step
            if isinstance(row, BaseException):
                r.error = row
            else:
                r.logits = row
            r.done.set()
        for size in calls:
            self.batches[size] = self.batches.get(size, 0) + 1
            if self.on_batch is not None:
                try:
                    self.on_batch(size)
                except Exception:  # a counter's failure must not fail the steps it counted
                    log.exception("batcher on_batch callback failed")

    @staticmethod
    def _result(request: _Request) -> np.ndarray:
        try:
            return StepBatcher._wait(request)
        finally:
            request.error = None  # no traceback kept on the request: its frames would hold the batch alive

    @staticmethod
    def _wait(request: _Request) -> np.ndarray:
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.logits


def step_ready(decoders: list, tokens: list[int], gates: list, ready, step) -> tuple[list, list[int]]:
    """``step_many``'s common part: ``ready(decoder)`` raises the MegaedgeError of a decoder that cannot step (it
    becomes that row's result); ``step(decoders, tokens, gates, calls)`` steps the rest, appending the size of each
    call it makes to ``calls``. Returns (each row's logits or error, calls)."""
    out: list = [None] * len(decoders)
    fit = []
    for i, decoder in enumerate(decoders):
        try:
            ready(decoder)
            fit.append(i)
        except MegaedgeError as exc:
            out[i] = exc
    calls: list[int] = []
    if fit:
        rows = step([decoders[i] for i in fit], [tokens[i] for i in fit], [gates[i] for i in fit], calls)
        for i, row in zip(fit, rows):
            out[i] = row
    return out, calls


def _value(row):
    if isinstance(row, BaseException):
        raise row
    return row
