"""What batching prompts across streams could save: native prompt (extend) time against its row count.

A decode step reads every weight for one row; a prompt of n rows reads them once for all n, and from some n on its
int8 products, not the read, bound it. Batching the prompts of k streams (one extend of k * n rows instead of k of
n) saves at most the reads the k - 1 extra calls make, and only while a call is still bound by its read. This
measures, at a real geometry with the runtime's own kernels (random int8 weights, as batched_decode.py writes
them; every sequence ``--context`` cached positions), the time of one extend of n rows for each n, interleaved
round by round, and for each hop-sized n the saving ``k * t(n) - t(k * n)`` as a share of ``k * t(n)``.

A stream's hop extends the open window's audio rows (up to ~100 for an 8 s window), the prompt's suffix and the
committed text (runtime/streaming.py ``_tail``), so its extends are tens of rows and more. ``--hop-tails BUNDLE``
streams every fourth held-out clip of the shipped fixture through BUNDLE (a fixture bundle: its audio tokens per
second are the real model's) with each stream preset, records the rows of every hop's prompt
(``StreamStats.tail_rows``), and weighs the saving by them: for each hop prompt of n rows, k streams' prompts of
n rows merged (``t(k n)``, interpolated in the measured curve) against k apart.

    python benchmarks/prompt_rows.py [--geometry 1.7b] [--block 32] [--rows 1,2,4,8,16,32,64,128,256,512]
                                     [--streams 8] [--rounds 3] [--hop-tails BUNDLE] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import provenance
from batched_decode import GEOMETRIES, write_weights

from megaedge.runtime import kernels, machine, native_decode

RESULTS = Path(__file__).parent / "results"


def hop_tails(bundle: Path) -> dict[str, list[int]]:
    """{preset: rows of every hop prompt} over every fourth held-out fixture clip streamed through ``bundle``."""
    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import read_set
    from megaedge.runtime.streaming import PRESETS, StreamOptions
    from megaedge.runtime.transcriber import Transcriber

    tr = Transcriber.from_bundle(bundle)
    clips = [audio_io.load(item["path"]) for item in read_set(fixture.heldout_manifest())[::4]]
    out = {}
    for preset in (p for p in PRESETS if p != "exact"):
        rows = []
        for samples in clips:
            stream = tr.create_stream(StreamOptions.preset(preset))
            for i in range(0, len(samples), 1600):  # 0.1 s chunks, as a microphone delivers them
                stream.accept_waveform(samples[i: i + 1600], 16000)
            stream.final()
            rows += stream.stats.tail_rows
        out[preset] = rows
    return out


def weighed(rows_seen: list[int], t: dict[int, float], k: int) -> dict:
    """The share of k streams' hop-prompt time a merged call would save, each hop of n rows standing for k of n."""
    sizes = np.array(sorted(t), float)
    seconds = np.array([t[int(n)] for n in sizes])
    at = lambda n: float(np.interp(n, sizes, seconds))  # noqa: E731 - within the measured rows
    apart = sum(k * at(n) for n in rows_seen)
    merged = sum(at(k * n) for n in rows_seen)
    ordered = sorted(rows_seen)
    if k * ordered[-1] > sizes[-1]:
        raise SystemExit(f"--rows must reach {k * ordered[-1]} (streams x the largest hop prompt)")
    return {"hops": len(ordered), "rows_median": ordered[len(ordered) // 2], "rows_p10": ordered[len(ordered) // 10],
            "rows_p90": ordered[9 * len(ordered) // 10], "rows_max": ordered[-1],
            "saving": round(1 - merged / apart, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="1.7b")
    parser.add_argument("--block", type=int, default=32, help="weight block size (32: the default recipe)")
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128,256,512")
    parser.add_argument("--streams", type=int, default=8, help="k: streams whose extends a batch would merge")
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hop-tails", type=Path, default=None, metavar="BUNDLE",
                        help="a fixture bundle: stream held-out clips through it and weigh the saving by the hops")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tails = hop_tails(args.hop_tails) if args.hop_tails else {}
    rows = sorted({int(r) for r in args.rows.split(",")})
    g = GEOMETRIES[args.geometry]
    built = kernels.load()
    threads = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        index, step_bytes, _ = write_weights(folder, g, block=args.block)
        info = SimpleNamespace(decoder={"native": index}, routed=False)
        decoder = native_decode.NativeDecoder(folder, info, built, threads=threads)
        decoder.wait_loaded()
        rng = np.random.default_rng(0)
        shape = (1, g["kv_heads"], args.context, g["head_dim"])
        decoder.start([rng.standard_normal(shape).astype(np.float32) for _ in range(2 * g["layers"])],
                      max(rows) + 1)
        x = rng.standard_normal((max(rows), g["hidden"])).astype(np.float32)
        times: dict[int, list[float]] = {n: [] for n in rows}
        for r in range(args.rounds + 1):  # round 0 warms
            for n in rows:
                decoder.rewind(args.context)
                t0 = time.perf_counter()
                decoder.extend(x[:n], 1)
                if r:
                    times[n].append(time.perf_counter() - t0)
            if r:
                print(f"round {r}/{args.rounds}: " + ", ".join(f"{n}: {times[n][-1] * 1e3:.0f} ms" for n in rows),
                      flush=True)
    t = {n: statistics.median(v) for n, v in times.items()}
    k = args.streams
    table = [{"rows": n, "seconds": round(t[n], 4), "ms_per_row": round(t[n] / n * 1e3, 2),
              "weight_read_share_at_step_rate": round(min(1.0, t[rows[0]] / t[n]), 3)} for n in rows]
    merged = [{"rows_per_stream": n, "streams": k, "separate_seconds": round(k * t[n], 4),
               "merged_seconds": round(t[k * n], 4), "saving": round(1 - t[k * n] / (k * t[n]), 3)}
              for n in rows if k * n in t]
    result = {
        "benchmark": "prompt_rows", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": provenance.commit(), "command": "python " + " ".join(sys.argv),
        "machine": {**machine.cpu_facts(), "python": platform.python_version(), "kernel_isa": built.isa,
                    "threads": threads},
        "geometry": args.geometry, "block": args.block, "context": args.context, "rounds": args.rounds,
        "weight_bytes_per_call": step_bytes, "extend": table, "merged_extends": merged,
        "hop_tails": {preset: weighed(rows_seen, t, k) for preset, rows_seen in tails.items()},
        "notes": "extend: the median time of one native extend of `rows` rows after `context` cached positions; "
                 "weight_read_share_at_step_rate: the one-row call's time over this call's (the share a read of "
                 "the weights at the one-row rate would take). merged_extends: `streams` extends of "
                 "`rows_per_stream` rows each, separately and as one extend of streams x rows (what a batched "
                 "prompt could at best do: the attention of a merged call would still run per stream).",
    }
    print(f"{'rows':>5} {'ms':>8} {'ms/row':>7} {'read':>5}")
    for row in table:
        print(f"{row['rows']:>5} {row['seconds'] * 1e3:>8.1f} {row['ms_per_row']:>7.2f} "
              f"{row['weight_read_share_at_step_rate']:>5.2f}")
    for row in merged:
        print(f"{k} x {row['rows_per_stream']} rows: {row['separate_seconds'] * 1e3:.0f} ms apart, "
              f"{row['merged_seconds'] * 1e3:.0f} ms as one ({row['saving'] * 100:.0f} % saved)")
    for preset, row in result["hop_tails"].items():
        print(f"{preset}: {row['hops']} hop prompts, rows median {row['rows_median']} (p10 {row['rows_p10']}, p90 "
              f"{row['rows_p90']}); {k} streams' merged: {row['saving'] * 100:.1f} % of their prompt time saved")
    out = Path(args.out) if args.out else RESULTS / f"prompt_rows_{args.geometry}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
