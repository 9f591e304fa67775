"""Hop latency of a stream on a busy CPU: spin-waiting thread pools against passive ones, in the same run.

A device runs more than megaedge. With OpenMP's and onnxruntime's default spin-waiting, threads that finished their
share of a parallel region keep a core busy polling while another process needs it, and the region's last thread
waits for a core: hop latency multiplies. megaedge's default is passive waits (runtime/kernels.passive_openmp,
runtime/session.py). This runs one stream per configuration in a fresh process (the OpenMP policy is read once at
start), with and without a CPU hog (one busy process per core), configurations interleaved round by round.

    python benchmarks/contention.py [--bundle B] [--seconds 30] [--rounds 2] [--hop 0.64]

Without --bundle it exports the shipped fixture as an INT8 bundle (native decoding where the kernels build).
Writes benchmarks/results/contention_<name>.json with p50 / p95 hop compute time per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import provenance

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = {  # environment of the measured process
    "spin": {"OMP_WAIT_POLICY": "ACTIVE", "MEGAEDGE_ORT_SPIN": "1"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE", "MEGAEDGE_ORT_SPIN": "0"},
}

CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[4])
from streaming import speech_audio
from megaedge.runtime.streaming import StreamOptions
from megaedge.runtime.transcriber import Transcriber

bundle, seconds, hop = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
tr = Transcriber.from_bundle(bundle, threads=2, vad="off")
audio = speech_audio(seconds, seed=1)
options = StreamOptions(endpointing=False, hop_seconds=hop)
stream = tr.create_stream(options)
step = int(hop * 16000)
costs = []
for i in range(0, audio.size, step):
    for event in stream.accept_waveform(audio[i:i + step], 16000):
        if event.kind == "partial":
            costs.append(event.compute_seconds)
print(json.dumps({"costs": costs, "decoder": "native" if tr.native is not None else "onnxruntime"}))
"""


_commit = provenance.commit

def _hogs(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def _run(bundle: Path, seconds: float, hop: float, policy: str) -> dict:
    env = {**os.environ, **POLICIES[policy]}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(seconds), str(hop),
                           str(Path(__file__).parent)], capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"measured process failed ({policy}): {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle to stream with (default: the fixture as an INT8 bundle)")
    parser.add_argument("--name", default=None, help="results name (default: fixture_int8, or the bundle's)")
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per measured stream")
    parser.add_argument("--hop", type=float, default=0.64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hogs", type=int, default=len(os.sched_getaffinity(0)), help="busy processes (default: "
                                                                                      "one per core)")
    args = parser.parse_args()
    from megaedge.runtime import machine

    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            bundle = Path(args.bundle)
        else:
            from megaedge import fixture
            from megaedge.export.bundle import ExportOptions
            from megaedge.export.int8 import Int8Options, export_int8

            print("exporting the fixture as an INT8 bundle", flush=True)
            bundle = export_int8(fixture.model_dir(), Path(tmp) / "int8", ExportOptions(force=True),
                                 Int8Options(report=False))
        costs: dict[str, list[float]] = {}
        decoder = None
        for r in range(args.rounds):
            for loaded in (False, True):
                for policy in POLICIES:  # interleaved: both policies under each condition, every round
                    hogs = _hogs(args.hogs) if loaded else []
                    try:
                        got = _run(bundle, args.seconds, args.hop, policy)
                    finally:
                        for hog in hogs:
                            hog.kill()
                            hog.wait()
                    key = f"{'busy' if loaded else 'quiet'}_{policy}"
                    costs.setdefault(key, []).extend(got["costs"])
                    decoder = got["decoder"]
                    c = np.asarray(got["costs"])
                    print(f"round {r + 1} {key}: p50 {np.percentile(c, 50) * 1e3:.0f} ms, "
                          f"p95 {np.percentile(c, 95) * 1e3:.0f} ms ({c.size} hops)", flush=True)
    summary = {key: {"p50_ms": round(float(np.percentile(v, 50)) * 1e3, 1),
                     "p95_ms": round(float(np.percentile(v, 95)) * 1e3, 1),
                     "max_ms": round(float(np.max(v)) * 1e3, 1), "hops": len(v)} for key, v in costs.items()}
    name = args.name or ("fixture_int8" if not args.bundle else Path(args.bundle).name)
    result = {
        "benchmark": "contention", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(), "command": "python " + " ".join(sys.argv),
        "machine": {**machine.cpu_facts(), "python": platform.python_version()},
        "bundle": name, "decoder": decoder, "hop_seconds": args.hop, "audio_seconds": args.seconds,
        "rounds": args.rounds, "hogs": args.hogs, "threads": 2, "results": summary,
        "notes": "Hop compute time of one stream (2 threads) fed as fast as it runs. busy: one pure-Python busy "
                 "loop per core beside it. spin: OMP_WAIT_POLICY=ACTIVE and onnxruntime spinning on (the "
                 "libraries' defaults before); passive: megaedge's defaults.",
    }
    print(f"{'configuration':<14} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for key, row in summary.items():
        print(f"{key:<14} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} {row['max_ms']:>8.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"contention_{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
