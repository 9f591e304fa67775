"""The server process (serve/server.py): before it listens (an address, a damaged or pinned bundle), hang-ups
and the shutdown (draining, its timeout, what a cut stream's client gets), and the prepared copies a pinned server
trusts."""

from __future__ import annotations

import numpy as np

from tests.conftest import run_cli
from tests.serve.conftest import Running


def test_an_address_it_cannot_have_is_one_line_before_anything_starts(fixture_bundles):
    """A busy port or an address this machine does not have: one line naming it and the fix, exit 1, no uvicorn
    log (uvicorn itself exits 3 after its start-up lines)."""
    import socket

    tmp_path = fixture_bundles["merged"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", str(tmp_path), "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"megaedge serve: error: cannot listen on 127.0.0.1:{port} (Address already in use); stop what listens "
        "there or pick another --port"]
    result = run_cli("serve", str(tmp_path), "--host", "999.1.1.1")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "--host '999.1.1.1' is not an address" in result.stderr


def test_a_damaged_bundle_is_one_line_before_the_server_listens(fixture_bundles, tmp_path):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(fixture_bundles["merged"], bundle)
    data = bytearray((bundle / "encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (bundle / "encoder.onnx").write_bytes(bytes(data))
    result = run_cli("serve", str(bundle), "--port", "0")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "encoder.onnx: sha256" in lines[0] and "does not match the manifest" in lines[0]


def test_a_name_binds_ipv4_first_and_falls_back(monkeypatch):
    """localhost resolving to ::1 first bound IPv6 only (uvicorn had bound IPv4 for any host without a colon)."""
    import socket

    from megaedge.serve.server import listen

    real = socket.getaddrinfo

    def v6_first(host, port, *args, **kwargs):
        found = real("127.0.0.1", port, *args, **kwargs)
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))] + found

    monkeypatch.setattr(socket, "getaddrinfo", v6_first)
    sock = listen("localhost", 0)
    try:
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


def test_serve_pins_a_digest_and_names_its_bundle_digest(fixture_bundles):
    """An operator pins the bundle a service runs (--expect-digest, as transcribe takes it) and /health names the
    digest of the one it runs; a bad $MEGAEDGE_VAD and a pin with the files unchecked are one line before the
    server listens."""
    from megaedge.runtime import manifest

    bundle = fixture_bundles["merged"]
    digest = manifest.bundle_digest(bundle)
    wrong = run_cli("serve", str(bundle), "--port", "0", "--expect-digest", "0" * 64)
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1 and "digest" in wrong.stderr
    unchecked = run_cli("serve", str(bundle), "--port", "0", "--expect-digest", digest, "--no-verify")
    assert unchecked.returncode == 1 and "drop --no-verify" in unchecked.stderr
    assert len(unchecked.stderr.strip().splitlines()) == 1
    vad = run_cli("serve", str(bundle), "--port", "0", env={"MEGAEDGE_VAD": "bogus"})
    assert vad.returncode == 1 and len(vad.stderr.strip().splitlines()) == 1 and "MEGAEDGE_VAD" in vad.stderr


def test_a_hang_up_drains_as_sigterm_does(fixture_bundles):
    """SIGHUP (a closed terminal, a supervisor) killed the server at once; now it drains as SIGTERM does and ends
    as a hang-up ends a process, with the digest of the bundle it ran in its log."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from megaedge.runtime import manifest
    from tests.conftest import REPO

    bundle = fixture_bundles["merged"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = "import sys\nfrom megaedge.cli.main import main\nsys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(bundle), "--port", str(port),
                             "--expect-digest", manifest.bundle_digest(bundle)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # not nohup's
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                if answer.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert answer.json()["bundle_digest"] == manifest.bundle_digest(bundle)
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGHUP, err
    assert "Traceback" not in err and manifest.bundle_digest(bundle) in err and "shutting down: no new work" in err
    assert "GET /health" not in out + err  # no access line per request (probes!) unless -v


def test_a_request_open_past_the_shutdown_timeout_is_answered_503(fixture_bundles, serve_transcriber, clips):
    """uvicorn ends requests still open when --shutdown-timeout runs out: the client gets OpenAI's error body with
    503 (it got a bare 500 and the log a CancelledError trace), the decode is cancelled, and the exit does not
    wait for it."""
    import threading
    import time

    import httpx

    from megaedge.serve.app import ServeConfig

    release, cancelled = threading.Event(), []

    class Slow:
        def __getattr__(self, name):
            return getattr(serve_transcriber, name)

        def transcribe(self, *args, **kwargs):
            for _ in range(300):  # a decode that outlasts the shutdown timeout, unless cancelled
                if kwargs["cancel"].is_set() or release.wait(0.1):
                    break
            cancelled.append(kwargs["cancel"].is_set())
            return serve_transcriber.transcribe(*args, **kwargs)

    running = Running(ServeConfig(bundle=str(fixture_bundles["merged"]), shutdown_timeout=0.5, max_streams=1,
                                  max_queue=1), Slow())
    answers = []

    def post():
        with open(clips[0]["path"], "rb") as f:
            answers.append(httpx.post(running.url + "/v1/audio/transcriptions", files={"file": f},
                                      data={"model": "m"}, timeout=60))

    clients = [threading.Thread(target=post) for _ in range(2)]  # one decoding, one queued for the only slot
    for client in clients:
        client.start()
    try:
        running.wait_for(lambda: running.state.decoding == 1 and running.state.admission.queued == 1,
                         "one request decoding and one queued")
        t0 = time.monotonic()
        running.stop()
        stopped = time.monotonic() - t0
        for client in clients:
            client.join(60)
    finally:
        release.set()
    assert [a.status_code for a in answers] == [503, 503], answers
    assert {a.json()["error"]["code"] for a in answers} == {"server_shutting_down"}
    assert stopped < 25  # not held until the decode (released at 30 s) ends
    running.wait_for(lambda: cancelled, "the decode saw its cancel event")
    assert cancelled == [True]


def test_under_nohup_a_hang_up_is_ignored(fixture_bundles):
    """A server started with SIGHUP ignored (nohup) keeps serving through a hang-up."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from tests.conftest import REPO

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = "import sys\nfrom megaedge.cli.main import main\nsys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(fixture_bundles["merged"]), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        def healthy():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        deadline = time.time() + 120
        while not healthy() and time.time() < deadline:
            time.sleep(0.3)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # long enough for a drain of an idle server to have ended it
        assert proc.poll() is None and healthy()
    finally:
        proc.terminate()
        proc.wait(60)


def test_a_stream_cut_by_the_shutdown_timeout_ends_with_its_error_event(fixture_bundles, tmp_path):
    """The real process: after --shutdown-timeout the server ended while a decode still ran (os._exit) before the
    event loop had sent the cut stream's error event, so the client saw a broken chunked body. It flushes first;
    and a drained SIGTERM ends the process as uvicorn does, by the signal (143)."""
    import json
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import soundfile as sf

    from tests.conftest import REPO, speechlike

    long = tmp_path / "long.flac"
    sf.write(str(long), np.tile(speechlike(30, seed=4), 20), 16000)  # 10 minutes: 20 segments
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = "import sys\nfrom megaedge.cli.main import main\nsys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(fixture_bundles["merged"]), "--port", str(port),
                             "--shutdown-timeout", "1", "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        events = []
        with open(long, "rb") as f, httpx.stream(
                "POST", f"http://127.0.0.1:{port}/v1/audio/transcriptions", timeout=60,
                files={"file": ("long.flac", f, "audio/flac")}, data={"model": "m", "stream": "true"}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if len(events) == 1:
                        proc.send_signal(signal.SIGTERM)
        assert events[0]["type"] == "transcript.text.delta"
        assert events[-1]["error"]["code"] == "server_shutting_down", events[-1]
        assert proc.wait(60) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait(60)


def test_a_pinned_server_uses_only_prepared_copies_sealed_under_its_users_key(fixture_bundles, serve_transcriber,
                                                                            tmp_path, monkeypatch):
    """The server's background load took the pin's file check from the CLI's check and loaded unpinned, so it used
    prepared copies whose record nobody sealed: it loads pinned now."""
    import shutil

    from megaedge.runtime import manifest, prepared
    from megaedge.serve.app import ServeConfig

    bundle = shutil.copytree(fixture_bundles["merged"], tmp_path / "b")
    prepared.prepare(bundle)
    monkeypatch.setenv("MEGAEDGE_STATE_DIR", str(tmp_path / "another-user"))  # sealed by a key not this user's
    def decoder_prepared(pin) -> bool:
        running = Running(ServeConfig(bundle=str(bundle), expected_digest=pin))
        try:
            state = running.state
            running.wait_for(lambda: state.transcriber is not None, "loaded")
            return state.transcriber.sessions["decoder"].prepared
        finally:
            running.stop()

    assert decoder_prepared(None) is True
    assert decoder_prepared(manifest.bundle_digest(bundle)) is False
