"""Batched native decode steps (assets/kernels/decode_batch.h, runtime/batching.py): sequences stepped together in
one kernel call get exactly the bits each gets stepped alone, on every kernel build, and concurrent greedy loops
meet in batches without changing a token."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from megaedge.errors import MegaedgeError
from megaedge.runtime import decoding, manifest, native_decode
from megaedge.runtime.batching import StepBatcher
from tests.conftest import int8_bundle_from
from tests.runtime.kernel_builds import VARIANTS, needs_kernel


@pytest.fixture(scope="module")
def fixture_int8(fixture_bundles, tmp_path_factory):
    return int8_bundle_from(fixture_bundles["merged"], tmp_path_factory.mktemp("batch_int8"))


@pytest.fixture(scope="module")
def fixture_int8_blocks_of_32(fixture_bundles, tmp_path_factory):
    """The same with decoder weights in blocks of 32, which the products treat apart (their own constant path)."""
    return int8_bundle_from(fixture_bundles["merged"], tmp_path_factory.mktemp("batch_int8_32"), block_size=32)


def _decoders(bundle, built, lengths, threads=2):
    """Spawned decoders over one set of weights, each with a cache of its own length (random prompt rows)."""
    info = manifest.read(bundle, verify=False)
    base = native_decode.NativeDecoder(bundle, info, built, threads=threads)
    rng = np.random.default_rng(7)
    out = []
    for n in lengths:
        d = base.spawn()
        ids = [int(t) for t in rng.integers(0, info.decoder["vocab_size"], n)]
        d.prefill(ids, np.zeros((0, d.hidden), np.float32), -1, 8)
        out.append((d, ids))
    return base, out


@needs_kernel
@pytest.mark.parametrize("blocks", [128, 32])
@pytest.mark.parametrize("built", VARIANTS)
def test_a_batch_gives_each_sequence_its_solo_bits(request, built, blocks):
    """Eleven sequences at different positions, stepped in batches of every size the products treat apart (a full
    group of eight and a part group of three, then 8, 7, ... 2 of them): batched logits and caches equal stepping
    each alone, with weights in blocks of 128 and of 32. The batch runs three threads, the solo steps two: each
    thread's share of a product is then an odd number of rows somewhere (AVX512 batches walk a share's two halves
    side by side and its last row alone), and a sequence's bits must not depend on the team either."""
    bundle = request.getfixturevalue("fixture_int8" if blocks == 128 else "fixture_int8_blocks_of_32")
    assert manifest.read(bundle, verify=False).decoder["native"]["layers"][0]["q"]["block"] == blocks
    lengths = (5, 17, 11, 2, 23, 8, 14, 3, 9, 20, 6)
    base, batched = _decoders(bundle, built, lengths, threads=3)
    base.wait_loaded()  # AVX512 builds step over weights packed at load (me_pack_q8), others over the row layout
    assert {getattr(layer, name).packed for layer in base.layers for name in native_decode.PROJECTIONS} == {
        built.pack_lanes(blocks)}
    _, alone = _decoders(bundle, built, lengths)
    for size in (11, 8, 7, 6, 5, 4, 3, 2):
        step = [3 + 7 * i + size for i in range(size)]
        got = native_decode.step_batch([d for d, _ in batched[:size]], step)
        for row, (d, _), token in zip(got, alone, step):
            np.testing.assert_array_equal(row, d.step(token))
    for (a, _), (b, _) in zip(batched, alone):
        assert a.length == b.length
        for mine, theirs in zip(a.keys + a.values, b.keys + b.values):
            np.testing.assert_array_equal(mine[:, : a.length], theirs[:, : b.length])


def test_batch_arguments_are_checked(fixture_int8):
    from tests.runtime.kernel_builds import KERNELS

    base, pairs = _decoders(fixture_int8, KERNELS, (4, 4))
    a, b = pairs[0][0], pairs[1][0]
    with pytest.raises(MegaedgeError, match="distinct"):
        native_decode.step_batch([a, a], [1, 2])
    with pytest.raises(MegaedgeError, match="2 decoders for 1 tokens"):
        native_decode.step_batch([a, b], [1])
    with pytest.raises(MegaedgeError, match="1-16 per call"):
        native_decode.step_batch([base.spawn() for _ in range(17)], list(range(17)))
    with pytest.raises(MegaedgeError, match="max_batch 0"):
        StepBatcher(0)


def _four_loops(bundle, cancels=(None, None, None, None)):
    """Four threads decode 24 tokens each from their own prompts through one StepBatcher (``cancels[k]``: thread
    k's cancel event); the tokens each gets alone, what each got (or its Cancelled message), errors, the batcher."""
    from megaedge.errors import Cancelled
    from tests.runtime.kernel_builds import KERNELS

    lengths = (6, 9, 12, 15)
    _, solo = _decoders(bundle, KERNELS, lengths)
    want = []
    for d, ids in solo:
        logits = d.prefill(ids, np.zeros((0, d.hidden), np.float32), -1, 30)
        want.append(decoding.greedy(_Adapter(d, None), logits, None, (), limit=24).tokens)
    batcher = StepBatcher(8, gather_seconds=0.05)
    _, shared = _decoders(bundle, KERNELS, lengths)
    got, errors = [None] * 4, []

    def run(k):
        try:
            d, ids = shared[k]
            logits = d.prefill(ids, np.zeros((0, d.hidden), np.float32), -1, 30)
            got[k] = decoding.greedy(_Adapter(d, batcher), logits, None, (), limit=24, cancel=cancels[k]).tokens
        except Cancelled as exc:
            got[k] = str(exc)
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not any(t.is_alive() for t in threads), "a loop waits for another that left"
    assert not errors, errors
    return want, got, batcher


@needs_kernel
def test_concurrent_greedy_loops_meet_in_batches_with_their_solo_tokens(fixture_int8):
    """Four threads through one StepBatcher: the tokens are the ones each gets alone, and most steps ran in
    batches of more than one."""
    want, got, batcher = _four_loops(fixture_int8)
    assert got == want
    batched = sum(calls * size for size, calls in batcher.batches.items() if size > 1)
    assert batched >= 0.5 * sum(calls * size for size, calls in batcher.batches.items()), batcher.batches


@needs_kernel
def test_a_cancelled_loop_leaves_a_batch_without_stalling_the_others(fixture_int8):
    """Of four threads stepping through one StepBatcher, one is cancelled after 5 tokens: it raises Cancelled, the
    other three still get their solo tokens and finish (the batcher waits for no step of a loop that left)."""

    class Trip:
        asked = 0

        def is_set(self):
            self.asked += 1
            return self.asked >= 5

    want, got, _ = _four_loops(fixture_int8, (None, Trip(), None, None))
    assert got[1] == "cancelled after 5 tokens"
    assert [got[k] for k in (0, 2, 3)] == [want[k] for k in (0, 2, 3)]


class _Adapter:
    """A NativeState-like view of one decoder (the greedy loop's interface) with an optional batcher."""

    def __init__(self, decoder, batcher):
        self.decoder, self.batcher = decoder, batcher

    def step(self, token, gate):
        return self.decoder.step(token) if self.batcher is None else self.batcher.step(self.decoder, token)

    def stepping(self):
        import contextlib

        return self.batcher.stepping() if self.batcher is not None else contextlib.nullcontext()


class _Fake:
    """A decoder for the batcher alone: a step's logits are [its id, the token, its steps so far]; ``hook`` runs
    inside each call (from the thread that leads it) with the decoders in it."""

    key = object()

    def __init__(self, ident, hook=None):
        self.ident, self.steps, self.hook, self.batch_key = ident, 0, hook, _Fake.key

    @staticmethod
    def step_many(decoders, tokens, gates):
        if decoders[0].hook is not None:
            decoders[0].hook(decoders)
        rows = []
        for d, token in zip(decoders, tokens):
            rows.append(np.array([d.ident, token, d.steps], np.float32))
            d.steps += 1
        return rows, [len(decoders)]


def _workers(batcher, count, steps, hook=None, pause=0.0):
    """``count`` threads stepping their own _Fake decoder ``steps`` times, ``pause`` seconds apart; (threads,
    decoders, errors)."""
    import time

    decoders, errors = [_Fake(k + 1, hook) for k in range(count)], []

    def run(d):
        try:
            with batcher.stepping():
                for i in range(steps):
                    assert batcher.step(d, i).tolist() == [d.ident, i, i]
                    time.sleep(pause)
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(d,)) for d in decoders]
    [t.start() for t in threads]
    return threads, decoders, errors


def test_ctrl_c_in_the_main_thread_stays_there():
    """A KeyboardInterrupt that lands in the main thread during a step it runs reaches that thread alone: it was
    handed to every thread of the batch the main thread led, and could leave the batcher led forever."""
    import time

    batcher = StepBatcher(8, gather_seconds=0.02)
    main, left = threading.main_thread(), [3]

    def interrupt_main(decoders):  # Ctrl-C whenever the main thread runs a call, three times
        time.sleep(0.001)
        if threading.current_thread() is main and left[0]:
            left[0] -= 1
            raise KeyboardInterrupt

    mine = _Fake(0, interrupt_main)
    threads, decoders, errors = _workers(batcher, 3, 150, interrupt_main, pause=0.002)
    interrupts = 0
    with batcher.stepping():
        for i in range(200):  # the last ones alone at the latest
            try:
                batcher.step(mine, i)
            except KeyboardInterrupt:
                interrupts += 1
                mine.steps += 1  # the interrupted step counts as taken
    [t.join(60) for t in threads]
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert interrupts == 3 and all(d.steps == 150 for d in decoders)
    assert not batcher._leader and not batcher._pending
    assert sum(size * n for size, n in batcher.batches.items() if size > 1) > 0  # the workers still met


def test_an_interrupted_follower_waits_for_the_step_a_leader_runs_on_its_decoder():
    """Ctrl-C while the main thread's step runs in another thread's batch: the main thread raises only once that
    step has ended (its decoder is being written), and the batcher serves the next steps."""
    import os
    import signal
    import time

    batcher = StepBatcher(8, gather_seconds=0.1)
    ended = []

    def signal_mid_step(decoders):
        if threading.current_thread() is not threading.main_thread() and mine in decoders and not ended:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)
            ended.append(time.perf_counter())

    mine = _Fake(0, signal_mid_step)
    with batcher.stepping():
        threads, (other,), errors = _workers(batcher, 1, 3, signal_mid_step)
        time.sleep(0.05)  # the worker leads, gathering until this thread's step arrives
        try:
            batcher.step(mine, 0)
            raise AssertionError("no interrupt")
        except KeyboardInterrupt:
            raised = time.perf_counter()
    [t.join(30) for t in threads]
    assert not errors and ended and raised >= ended[0] and mine.steps == 1
    with batcher.stepping():
        assert batcher.step(mine, 5).tolist() == [0, 5, 1]


def test_a_failing_batch_counter_fails_no_step(caplog):
    batcher = StepBatcher(8, gather_seconds=0.01)

    def broken(size):
        raise RuntimeError("metrics backend down")

    batcher.on_batch = broken
    threads, decoders, errors = _workers(batcher, 3, 20)
    [t.join(60) for t in threads]
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert "on_batch callback failed" in caplog.text


@pytest.fixture
def deadline():
    """A hang fails the test after 20 s instead of blocking the suite (SIGALRM interrupts the main thread's wait)."""
    import signal

    def expired(signum, frame):
        raise TimeoutError("the step hung")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_ctrl_c_as_a_step_is_queued_withdraws_it(deadline):
    """Ctrl-C landing just after the main thread queued its step (a signal can land between any two calls): the
    step was left queued, and another thread's batch later stepped the decoder its owner had given up on."""

    class Tripping(threading.Condition):
        trips = 1

        def notify_all(self):
            if threading.current_thread() is threading.main_thread() and self.trips:
                self.trips -= 1
                raise KeyboardInterrupt
            super().notify_all()

    batcher = StepBatcher(8, gather_seconds=0.02)
    batcher._cond = Tripping()
    mine = _Fake(0)
    with batcher.stepping():
        threads, decoders, errors = _workers(batcher, 2, 30)
        with pytest.raises(KeyboardInterrupt):
            batcher.step(mine, 0)
        [t.join(60) for t in threads]
    assert not errors and all(d.steps == 30 for d in decoders)
    assert mine.steps == 0 and not batcher._pending and not batcher._leader


def test_ctrl_c_as_a_leader_starts_its_batch_answers_it(deadline, monkeypatch):
    """Ctrl-C landing as the main thread enters the run of its own batch: the step was never answered, so the main
    thread waited for it forever (until a second Ctrl-C)."""
    batcher = StepBatcher(8, gather_seconds=0.02)
    run, trips = batcher._run, [1]

    def tripping(batch):
        if threading.current_thread() is threading.main_thread() and trips[0]:
            trips[0] -= 1
            raise KeyboardInterrupt
        return run(batch)

    monkeypatch.setattr(batcher, "_run", tripping)
    mine = _Fake(0)
    with pytest.raises(KeyboardInterrupt):
        batcher.step(mine, 0)
    assert not batcher._leader and not batcher._pending and mine.steps == 0
    assert batcher.step(mine, 1).tolist() == [0, 1, 0]  # the batcher serves the next step
