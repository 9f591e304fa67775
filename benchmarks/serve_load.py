"""`megaedge serve` under load, then an RSS soak of the server process.

1. Load: ``--clients`` realtime WebSocket clients connect at once to a server with ``--max-streams``; the admitted
   ones stream a held-out clip faster than real time (+1 s of silence) while as many transcription requests arrive
   over HTTP. Reports admitted / refused (close 1013, HTTP 429) counts, transcripts checked against offline
   transcription of the same samples, time from the last audio sent to ``completed``, HTTP latencies.
2. Soak: for ``--minutes``, ``--soak-streams`` realtime clients stream clips at real-time pace (reconnecting every
   5 utterances) and ``--soak-http`` clients post files back to back; the server's RSS is sampled every 2 s
   (start, end, max). Every transcript is checked the same way.

The server runs as a subprocess (`python -m megaedge serve`), so RSS is its own. Default bundle: the fixture's,
exported to a temporary folder (needs the export extra). Writes benchmarks/results/serve_load.json.
Usage: python benchmarks/serve_load.py [--bundle DIR] [--clients 32] [--max-streams 8] [--minutes 3]
       [--soak-streams 6] [--soak-http 2] [--threads N] [--out serve_load.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import provenance

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
RATE = 16000
SILENCE = np.zeros(RATE, "<i2")
WARMUP_SECONDS = 60.0


_commit = provenance.commit

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


class Checker:
    """Offline transcription of the exact samples each final covers, in this process (one thread per call)."""

    def __init__(self, bundle: Path):
        from megaedge.runtime.transcriber import Transcriber

        self.tr = Transcriber.from_bundle(bundle, threads=1, vad="off")
        self.lock = threading.Lock()
        self.checked = self.mismatched = 0
        self.examples: list[dict] = []

    def check(self, audio: np.ndarray, done: dict) -> bool:
        span = audio[round(done["start"] * RATE): round(done["end"] * RATE)]
        expected = self.tr.transcribe(span, RATE).text if np.any(span) else ""
        ok = expected == done["transcript"]
        with self.lock:
            self.checked += 1
            if not ok:
                self.mismatched += 1
                if len(self.examples) < 5:
                    self.examples.append({"got": done["transcript"], "offline": expected})
        return ok


def _append(pcm: np.ndarray) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm.tobytes()).decode()})


def realtime_utterance(ws, pcm: np.ndarray, realtime: bool, sent: list) -> tuple[dict, float]:
    """Stream one clip + 1 s silence; the completed event and the seconds from sending the audio where the
    utterance ended (its endpoint) to receiving it."""
    audio = np.concatenate([pcm, SILENCE])
    base = sum(len(a) for a in sent)  # session time of audio[0]
    start = time.perf_counter()
    stamps = []
    for i in range(0, len(audio), RATE // 10):
        if realtime:
            time.sleep(max(0.0, start + i / RATE - time.perf_counter()))
        ws.send(_append(audio[i : i + RATE // 10]))
        stamps.append((base + min(i + RATE // 10, len(audio)), time.perf_counter()))
    sent.append(audio)
    while True:
        event = json.loads(ws.recv(timeout=300))
        if event["type"] == "conversation.item.input_audio_transcription.completed":
            end = round(event["end"] * RATE)
            at = next((t for last, t in stamps if last >= end), stamps[-1][1])
            return event, time.perf_counter() - at
        if event["type"] == "error":
            raise RuntimeError(event["error"])


SESSION = json.dumps({"type": "transcription_session.update",
                      "session": {"input_audio_format": "pcm16", "input_audio_rate": RATE}})


def load_phase(url: str, ws_url: str, clips: list[dict], clients: int, checker: Checker) -> dict:
    from contextlib import ExitStack

    import httpx
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    stack = ExitStack()
    sockets = [stack.enter_context(connect(ws_url, open_timeout=60, max_size=None)) for _ in range(clients)]
    first = [json.loads(ws.recv(timeout=60)) for ws in sockets]
    admitted = [ws for ws, e in zip(sockets, first) if e["type"] == "transcription_session.created"]
    refused_codes = []
    for ws, e in zip(sockets, first):
        if e["type"] == "error":
            try:
                ws.recv(timeout=60)
            except ConnectionClosed as closed:
                refused_codes.append(closed.rcvd.code if closed.rcvd else None)

    def one_stream(args):
        ws, clip = args
        ws.send(SESSION)
        sent: list = []
        done, latency = realtime_utterance(ws, clip["pcm"], False, sent)
        ok = checker.check(sent[0], done)
        ws.close()
        return latency, ok

    def one_request(clip):
        t0 = time.perf_counter()
        with open(clip["path"], "rb") as f:
            reply = httpx.post(url + "/v1/audio/transcriptions", files={"file": f}, timeout=600)
        seconds = time.perf_counter() - t0
        if reply.status_code != 200:
            return reply.status_code, seconds, None
        return 200, seconds, reply.json()["text"] == checker.tr.transcribe(clip["path"]).text

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(admitted) + clients) as pool:
        streams = pool.map(one_stream, [(ws, clips[i % len(clips)]) for i, ws in enumerate(admitted)])
        requests = list(pool.map(one_request, [clips[i % len(clips)] for i in range(clients)]))
        streams = list(streams)
    wall = time.perf_counter() - t0
    stack.close()
    ok_requests = [r for r in requests if r[0] == 200]
    return {
        "realtime": {"clients": clients, "admitted": len(admitted), "refused": len(refused_codes),
                     "refused_close_codes": sorted(set(refused_codes)),
                     "transcripts_equal_offline": sum(ok for _, ok in streams),
                     "final_latency_s_p50": _pct([lat for lat, _ in streams], 50),
                     "final_latency_s_p95": _pct([lat for lat, _ in streams], 95)},
        "http": {"requests": clients, "ok": len(ok_requests), "status_429": sum(r[0] == 429 for r in requests),
                 "other_status": sorted({r[0] for r in requests} - {200, 429}),
                 "texts_equal_offline": sum(bool(r[2]) for r in ok_requests),
                 "latency_s_p50": _pct([r[1] for r in ok_requests], 50),
                 "latency_s_p95": _pct([r[1] for r in ok_requests], 95)},
        "wall_seconds": round(wall, 2),
    }


def soak_phase(url: str, ws_url: str, clips: list[dict], minutes: float, streams: int, http: int, pid: int,
               checker: Checker) -> dict:
    import httpx
    import psutil
    from websockets.sync.client import connect

    proc = psutil.Process(pid)
    stop = threading.Event()
    rss: list[tuple[float, int]] = []
    counts = {"utterances": 0, "connections": 0, "http_requests": 0, "errors": 0}
    latencies: list[float] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def sampler():
        while not stop.is_set():
            rss.append((round(time.perf_counter() - t0, 1), proc.memory_info().rss))
            stop.wait(2.0)

    def stream_worker(seed: int):
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                with connect(ws_url, open_timeout=60, max_size=None) as ws:
                    ws.recv(timeout=60)
                    ws.send(SESSION)
                    with lock:
                        counts["connections"] += 1
                    sent: list = []  # this connection's audio: session time
                    for _ in range(5):
                        if stop.is_set():
                            break
                        done, latency = realtime_utterance(ws, rng.choice(clips)["pcm"], True, sent)
                        checker.check(np.concatenate(sent), done)
                        with lock:
                            counts["utterances"] += 1
                            latencies.append(latency)
            except Exception as exc:  # counted, and the worker reconnects
                with lock:
                    counts["errors"] += 1
                print(f"stream worker {seed}: {exc}", file=sys.stderr)

    def http_worker(seed: int):
        rng = random.Random(1000 + seed)
        while not stop.is_set():
            clip = rng.choice(clips)
            with open(clip["path"], "rb") as f:
                reply = httpx.post(url + "/v1/audio/transcriptions", files={"file": f}, timeout=600)
            with lock:
                counts["http_requests"] += 1
                if reply.status_code != 200 or reply.json()["text"] != clip["offline"]:
                    counts["errors"] += 1

    threads = [threading.Thread(target=sampler, daemon=True)]
    threads += [threading.Thread(target=stream_worker, args=(i,), daemon=True) for i in range(streams)]
    threads += [threading.Thread(target=http_worker, args=(i,), daemon=True) for i in range(http)]
    for t in threads:
        t.start()
    time.sleep(minutes * 60)
    stop.set()
    for t in threads:
        t.join(300)
    values = [r for _, r in rss]
    mib = lambda b: round(b / 2**20, 1)  # noqa: E731
    # Warm-up: the first minute fills the pools and allocator arenas; flat after it is what "no leak" means.
    warm = [r for t, r in rss if t >= min(WARMUP_SECONDS, minutes * 30)] or values
    return {"minutes": minutes, "realtime_clients": streams, "http_clients": http, **counts,
            "final_latency_s_p50": _pct(latencies, 50), "final_latency_s_p95": _pct(latencies, 95),
            "rss_mib_start": mib(values[0]), "rss_mib_end": mib(values[-1]), "rss_mib_max": mib(max(values)),
            "rss_mib_after_warmup": mib(warm[0]), "rss_mib_max_after_warmup": mib(max(warm)),
            "rss_mib_growth_after_warmup": mib(values[-1] - warm[0]),
            "rss_mib_samples": [(t, mib(r)) for t, r in rss[:: max(1, len(rss) // 60)]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: the fixture, exported now)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-streams", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=1.0, help="soak duration (30 for the full soak)")
    parser.add_argument("--soak-streams", type=int, default=6)
    parser.add_argument("--soak-http", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="server --threads (default 1: one per stream)")
    parser.add_argument("--out", default="serve_load.json")
    args = parser.parse_args()

    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime import machine
    from megaedge.runtime.evaluate import read_set

    work = tempfile.TemporaryDirectory(prefix="serve-load-")
    bundle = args.bundle
    if bundle is None:
        from megaedge.export.bundle import ExportOptions, export_bundle

        bundle = export_bundle(fixture.model_dir(), Path(work.name) / "bundle", ExportOptions(mode="merged"))
    checker = Checker(bundle)
    clips = read_set(fixture.heldout_manifest())[::4]
    for clip in clips:
        clip["pcm"] = (np.clip(audio_io.load(clip["path"]), -1, 1) * 32767).astype("<i2")
        clip["offline"] = checker.tr.transcribe(clip["path"]).text
    port = _free_port()
    command = [sys.executable, "-m", "megaedge", "serve", str(bundle), "--port", str(port), "--max-streams",
               str(args.max_streams), "--threads", str(args.threads), "--vad", "off"]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "MEGAEDGE_NO_PROGRESS": "1"})
    url, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
    import httpx

    try:
        t0 = time.perf_counter()
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.perf_counter() - t0 > 300:
                raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        ready = time.perf_counter() - t0
        print(f"server ready in {ready:.2f} s; load phase: {args.clients} clients vs --max-streams "
              f"{args.max_streams}", flush=True)
        load = load_phase(url, ws_url, clips, args.clients, checker)
        print(json.dumps(load, indent=2), flush=True)
        print(f"soak: {args.minutes:g} min", flush=True)
        soak = soak_phase(url, ws_url, clips, args.minutes, args.soak_streams, args.soak_http, server.pid, checker)
        metrics = httpx.get(url + "/metrics", timeout=30).text
    finally:
        server.terminate()
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _commit(),
        "command": " ".join(["python", *sys.argv]), "server_command": " ".join("BUNDLE" if part == str(bundle) else part for part in command[1:]),
        "machine": {**machine.cpu_facts(), "python": platform.python_version()},
        "bundle": "BUNDLE (--bundle)" if args.bundle else "fixture (merged FP32, exported by this run)",
        "server_ready_seconds": round(ready, 2), "load": load,
        "soak": soak,
        "transcripts_checked": checker.checked, "transcripts_differing_from_offline": checker.mismatched,
        "differences": checker.examples,
        "server_metrics_tail": [line for line in metrics.splitlines()
                                if line.startswith(("megaedge_requests_total", "megaedge_errors_total",
                                                    "megaedge_decoded_tokens_total"))],
    }
    summary = {k: v for k, v in results["soak"].items() if k != "rss_mib_samples"}
    print(json.dumps(summary, indent=2))
    print(f"transcripts checked {checker.checked}, differing from offline {checker.mismatched}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / args.out}")
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
