"""runtime/session.py's GPU gate: onnxruntime captures CUDA graphs in global capture mode, so a capture must run
while no other thread does GPU work. The lock's semantics are tested here with threads; which fixed-KV steps hold
it alone is tested on a runner with a CUDA device named (the real capture is tests/runtime/test_cuda.py's)."""

from __future__ import annotations

import threading
import time

import pytest

from megaedge.runtime import fixed_kv
from megaedge.runtime.session import GpuGate


def _in_thread(fn):
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def _enter(hold, order: list, label: str):
    """A thread that takes ``hold()`` (the gate's shared or alone), notes ``label`` inside it and leaves."""
    def run():
        with hold():
            order.append(label)

    return _in_thread(run)


def _holding(hold, order: list | None = None, label: str = ""):
    """A thread inside ``hold()`` once this returns, staying until the returned event is set; it notes ``label``
    on its way out, if given. Returns (thread, release)."""
    inside, release = threading.Event(), threading.Event()

    def run():
        with hold():
            inside.set()
            release.wait(5)
            if label:
                order.append(label)

    thread = _in_thread(run)
    inside.wait(5)
    return thread, release


def test_shared_holders_overlap_and_alone_waits_for_them():
    gate, inside, order = GpuGate(), threading.Barrier(2, timeout=5), []
    release = threading.Event()

    def shared():
        with gate.shared():
            inside.wait()  # both shared holders are in at once
            release.wait(5)
            order.append("shared out")

    threads = [_in_thread(shared), _in_thread(shared)]
    time.sleep(0.2)
    waiter = _enter(gate.alone, order, "alone in")
    time.sleep(0.2)
    assert order == []  # the capture waits for the GPU work under way
    release.set()
    for t in (*threads, waiter):
        t.join(5)
    assert order == ["shared out", "shared out", "alone in"]


def test_alone_keeps_new_shared_holders_out_until_it_is_done():
    gate, order = GpuGate(), []
    a, release = _holding(gate.alone, order, "alone out")
    b = _enter(gate.shared, order, "shared in")
    time.sleep(0.2)
    assert order == []
    release.set()
    a.join(5), b.join(5)
    assert order == ["alone out", "shared in"]


def test_a_waiting_capture_is_not_starved_by_a_stream_of_shared_holders():
    gate, order = GpuGate(), []
    a, release_first = _holding(gate.shared)
    b = _enter(gate.alone, order, "alone")
    time.sleep(0.2)
    c = _enter(gate.shared, order, "late shared")
    time.sleep(0.2)
    assert order == []  # the late shared holder queues behind the waiting capture
    release_first.set()
    for t in (a, b, c):
        t.join(5)
    assert order == ["alone", "late shared"]


def test_off_gpu_calls_never_wait():
    gate = GpuGate()
    with gate.alone():
        with gate.shared(on_gpu=False):  # CPU sessions pass through
            pass


class _Buffers:
    def __init__(self, graph_id):
        self.graph_id = graph_id


def _runner(device, graphs, graph_id=None, runs=0):
    """A runner with only what gate_for reads, the calling thread having stepped ``graph_id`` ``runs`` times."""
    runner = fixed_kv.FixedKVRunner.__new__(fixed_kv.FixedKVRunner)
    runner.device, runner.cuda_graph = device, graphs
    runner._thread_runs = threading.local()
    for _ in range(runs):
        runner.count_step(graph_id)
    return runner


@pytest.mark.parametrize("device, graphs, graph_id, runs, alone", [
    ("cuda", True, 1, 0, True), ("cuda", True, 3, fixed_kv.CAPTURE_RUNS - 1, True),
    ("cuda", True, 1, fixed_kv.CAPTURE_RUNS, False),  # captured: replays share the GPU
    ("cuda", True, -1, 0, False),  # beyond MAX_GRAPHS: never captured
    ("cuda", False, 1, 0, False),  # a session onnxruntime opened without CUDA graphs
    ("cpu", False, -1, 0, False),
])
def test_fixed_kv_steps_hold_the_gate_alone_only_while_they_may_capture(monkeypatch, device, graphs, graph_id, runs,
                                                                         alone):
    calls = []

    class Recorder:
        def shared(self, on_gpu=True):
            calls.append("shared" if on_gpu else "off")
            return GpuGate().shared(on_gpu)

        def alone(self):
            calls.append("alone")
            return GpuGate().alone()

    monkeypatch.setattr(fixed_kv, "gpu_gate", Recorder())
    runner = _runner(device, graphs, graph_id, runs)
    with runner.gate_for(_Buffers(graph_id)):
        pass
    with runner.gate_for():  # a prompt run never captures
        pass
    want_prompt = "shared" if device == "cuda" else "off"
    assert calls == ["alone" if alone else want_prompt, want_prompt]


def test_a_buffer_set_stepped_from_another_thread_captures_there_alone(monkeypatch):
    """onnxruntime keeps captured CUDA graphs per calling thread: buffers captured by one thread are captured again
    by the next thread that steps them (a pooled set leased by a worker thread), so that thread's first steps go
    alone too: captured under the shared gate, beside other threads' calls, the likely cause of the empty
    transcript the concurrency test got on the lent H200."""
    calls = []

    class Recorder:
        def shared(self, on_gpu=True):
            calls.append("shared")
            return GpuGate().shared(on_gpu)

        def alone(self):
            calls.append("alone")
            return GpuGate().alone()

    monkeypatch.setattr(fixed_kv, "gpu_gate", Recorder())
    runner = _runner("cuda", True, 1, fixed_kv.CAPTURE_RUNS)  # graph 1 captured by this thread
    buffers = _Buffers(1)

    def other_thread():
        with runner.gate_for(buffers):
            pass

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    with runner.gate_for(buffers):
        pass
    assert calls == ["alone", "shared"]
