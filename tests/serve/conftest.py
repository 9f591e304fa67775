"""A megaedge server in a background thread of the test process (uvicorn on a free port), and clients for it."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'megaedge[serve]'")
pytest.importorskip("websockets", reason="needs websockets (dev extra)")

RATE = 16000


class Running:
    """``make_server(config)`` serving in a thread; ``url`` / ``ws_url``; ``stop()`` shuts it down as SIGTERM would."""

    def __init__(self, config, transcriber=None):
        from megaedge.serve.server import make_server

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = make_server(replace(config, port=self.port), transcriber)
        self.state = self.server.megaedge
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/realtime?intent=transcription"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(120)

    def wait_for(self, predicate, what: str, seconds: float = 60.0):
        """Poll until ``predicate()`` is truthy (an outcome, not a timing: the deadline only bounds a hang)."""
        deadline = time.monotonic() + seconds
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"never happened: {what}")
            time.sleep(0.05)


def health(running) -> dict:
    import httpx

    return httpx.get(running.url + "/health", timeout=30).json()


def metric(running, name: str, labels: str = "", missing: float | None = None) -> float:
    """A sample's value; ``missing`` if given stands for a labelled series not yet created."""
    import httpx

    text = httpx.get(running.url + "/metrics", timeout=30).text
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    if missing is not None:
        return missing
    raise AssertionError(f"{key} not in /metrics")


def pcm16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2")


def append_event(pcm: np.ndarray) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm.tobytes()).decode()})


def send_audio(ws, pcm: np.ndarray, chunk: int = 1600) -> None:
    for i in range(0, len(pcm), chunk):
        ws.send(append_event(pcm[i : i + chunk]))


def receive_until(ws, kind: str, timeout: float = 120.0) -> list[dict]:
    """Events up to and including the first of type ``kind``."""
    events = []
    while True:
        event = json.loads(ws.recv(timeout=timeout))
        events.append(event)
        if event["type"] == kind:
            return events


def text_part(tr, segment, forced: bool) -> tuple[list[int], list[float]]:
    """A segment's tokens and log-probabilities after the language prefix (all of them when the language was
    forced, or when the model named none: a garbled decode of a long silence)."""
    ids, logprobs = list(segment.token_ids), list(segment.logprobs)
    if not forced and tr.manifest.prompt.asr_text in ids:
        at = ids.index(tr.manifest.prompt.asr_text)
        ids, logprobs = ids[at + 1 :], logprobs[at + 1 :]
    return ids, logprobs


def two_clip_file(first, second, gap_seconds: float, path):
    """A float WAV of two clips (paths) with ``gap_seconds`` of silence between: two long-form segments."""
    import soundfile as sf

    from megaedge.runtime import audio as audio_io

    gap = np.zeros(round(16000 * gap_seconds), np.float32)
    sf.write(str(path), np.concatenate([audio_io.load(first), gap, audio_io.load(second)]), 16000, subtype="FLOAT")
    return path


def barrier(ws) -> list[dict]:
    """Events up to the reply to a deliberately unknown event: the server answers events in order, so every event
    sent before it has been processed."""
    ws.send(json.dumps({"type": "megaedge.test.barrier"}))
    events = []
    while True:
        event = json.loads(ws.recv(timeout=120))
        if event["type"] == "error" and event["error"]["code"] == "unknown_event_type" and \
                "megaedge.test.barrier" in event["error"]["message"]:
            return events
        events.append(event)


@pytest.fixture(scope="session")
def serve_transcriber(fixture_bundles):
    from megaedge.runtime.transcriber import Transcriber

    return Transcriber.from_bundle(fixture_bundles["merged"], vad="off")


@pytest.fixture(scope="session")
def clips():
    """Held-out clips: path, reference and 16 kHz pcm16 samples; a spread of scenarios."""
    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import read_set

    items = read_set(fixture.heldout_manifest())
    chosen = items[::12][:8]
    for item in chosen:
        item["pcm"] = pcm16(audio_io.load(item["path"]))
    return chosen


@pytest.fixture(scope="module")
def server(fixture_bundles, serve_transcriber):
    from megaedge.serve.app import ServeConfig

    running = Running(ServeConfig(bundle=str(fixture_bundles["merged"]), max_streams=8, max_queue=8),
                      serve_transcriber)
    yield running
    running.stop()
