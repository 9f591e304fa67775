"""One Transcriber shared by threads: calls and streams side by side give exactly what each gives alone.

Before decoding states were per call (runtime/decoding.py), two threads in ``transcribe`` on one native-decoding
Transcriber aborted the process (both wrote one KV cache that the other reallocated), and a stream beside a
``transcribe`` raised shape errors. Each case runs in a child process, so that a crash fails the test instead of
ending the test run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from megaedge.runtime import kernels
from tests.conftest import REPO, int8_bundle_from

needs_kernel = pytest.mark.skipif(kernels.compiler() is None, reason="no C compiler for the native kernels")

CHILD = textwrap.dedent('''
    import sys, threading
    import numpy as np
    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import read_set
    from megaedge.runtime.streaming import StreamOptions
    from megaedge.runtime.transcriber import Transcriber

    bundle, calls, decode, route = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    tr = Transcriber.from_bundle(bundle, decode=decode, threads=1)
    items = read_set(fixture.heldout_manifest())
    clips = [audio_io.load(item["path"]) for item in items[:6]]
    kw = dict(route=route, segment_seconds=None)
    alone = [tr.transcribe(c, **kw) for c in clips]
    exact = StreamOptions.preset("exact")

    def stream(clip):
        s = tr.create_stream(exact)
        for i in range(0, len(clip), 4000):
            s.accept_waveform(clip[i:i + 4000], 16000)
        return list(s.final().token_ids)

    streamed_alone = [stream(clips[0]), stream(clips[1])]
    errors, results = [], {}

    def worker(k):
        try:
            got = []
            for i in range(calls):
                clip = i % len(clips)
                r = tr.transcribe(clips[clip], **kw)
                got.append((clip, r.token_ids, r.text, r.mean_logprob))
            results[k] = got
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            errors.append(repr(exc))

    def streamer(k):
        try:
            results[k] = [stream(clips[k - 2]) for _ in range(3)]
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(0,)), threading.Thread(target=worker, args=(1,)),
               threading.Thread(target=streamer, args=(2,)), threading.Thread(target=streamer, args=(3,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in (0, 1):
        assert len(results[k]) == calls
        for clip, tokens, text, logprob in results[k]:
            want = alone[clip]
            assert tokens == want.token_ids and text == want.text and logprob == want.mean_logprob, (k, clip)
    for k in (2, 3):
        assert results[k] == [streamed_alone[k - 2]] * 3, k
    assert any(a.token_ids for a in alone)
    print("OK", calls)
''')


def _run(bundle, calls: int, decode: str, route: str = "auto"):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(calls), decode, route],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0 and f"OK {calls}" in proc.stdout, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def fixture_int8(fixture_bundles, tmp_path_factory):
    return int8_bundle_from(fixture_bundles["merged"], tmp_path_factory.mktemp("concurrency_int8"))


@needs_kernel
def test_two_threads_and_two_streams_share_a_native_transcriber(fixture_int8):
    """The case that aborted the process: two threads x 50 calls on the native decoder, two streams beside them."""
    _run(fixture_int8, 50, "native")


def test_two_threads_and_two_streams_share_an_onnxruntime_transcriber(fixture_bundles):
    _run(fixture_bundles["merged"], 10, "ort")


def test_routed_threads_keep_their_own_route(fixture_bundles):
    """Routes are per call: threads on the base and on the LoRA route of one routed Transcriber."""
    code = textwrap.dedent('''
        import sys, threading
        from megaedge import fixture
        from megaedge.runtime import audio as audio_io
        from megaedge.runtime.evaluate import read_set
        from megaedge.runtime.transcriber import Transcriber

        tr = Transcriber.from_bundle(sys.argv[1], threads=1)
        clips = [audio_io.load(i["path"]) for i in read_set(fixture.heldout_manifest())[:4]]
        want = {r: [tr.transcribe(c, route=r).token_ids for c in clips] for r in ("base", "lora")}
        assert want["base"] != want["lora"]
        errors = []

        def worker(route):
            try:
                for _ in range(3):
                    for c, w in zip(clips, want[route]):
                        assert tr.transcribe(c, route=route).token_ids == w, route
            except BaseException as exc:  # noqa: BLE001
                errors.append(repr(exc))

        threads = [threading.Thread(target=worker, args=(r,)) for r in ("base", "lora")]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
        print("OK")
    ''')
    proc = subprocess.run([sys.executable, "-c", code, str(fixture_bundles["routed"])], capture_output=True,
                          text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


FORKED = textwrap.dedent('''
    import os, sys
    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import read_set
    from megaedge.runtime.transcriber import Transcriber

    tr = Transcriber.from_bundle(sys.argv[1], decode="native", threads=2)
    clip = audio_io.load(read_set(fixture.heldout_manifest())[0]["path"])

    def in_child(warm: bool, thread: bool = False):
        """The child's transcript (or its one-line error), from its main thread or a new one; a child that hangs
        is killed after 60 s."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            import signal
            import threading
            signal.alarm(60)
            out = []

            def run():
                try:
                    out.append("TEXT " + tr.transcribe(clip).text)
                except Exception as exc:  # noqa: BLE001 - reported to the parent
                    out.append(f"ERROR {type(exc).__name__}: {exc}")

            if thread:
                worker = threading.Thread(target=run)
                worker.start()
                worker.join()
            else:
                run()
            os.write(w, out[0].encode())
            os._exit(0)
        os.close(w)
        out = os.read(r, 1 << 16).decode()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status), f"the child hung (warm={warm})"
        return out

    # a bundle loaded before the fork (its weights shared copy-on-write) serves a child while the parent ran nothing
    cold = in_child(False)
    want = tr.transcribe(clip).text
    assert cold == "TEXT " + want, cold
    warm = in_child(True)  # the parent's OpenMP team now exists: the child would wait for it for ever
    assert warm.startswith("ERROR MegaedgeError: this process was forked from process") and "\\n" not in warm, warm
    assert "threads=1" in warm and "spawn" in warm
    # a new thread of the child starts a team of its own (a gthread worker): served, not refused
    assert in_child(True, thread=True) == "TEXT " + want
    print("OK")
''')


@needs_kernel
def test_a_process_forked_after_the_kernels_ran_is_told_not_hung(fixture_int8):
    """gunicorn's pre-fork with a warm-up: GNU OpenMP's threads do not survive fork(), so the child's first
    parallel kernel waited for ever; now it is one line naming the fix. A fork before any work still serves, and
    so does a new thread of the child (its team is its own)."""
    proc = subprocess.run([sys.executable, "-c", FORKED, str(fixture_int8)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
