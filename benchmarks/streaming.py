"""Streaming costs: hop latency early vs late in a stream (against re-encoding everything each hop), memory over
hours of simulated audio, first-partial latency and end-of-speech -> final latency.

    python benchmarks/streaming.py [--bundle B] [--geometry 0.6b --work DIR] [--hours 2] [--skip-memory]
        [--geometry-bundle B --engines auto,ort --geometry-hop 2]

Without --bundle it exports the shipped fixture (FP32, merged). --geometry 0.6b also exports a random-weight 0.6B
bundle and measures its hop latency (speech-like noise: the cost does not depend on what is said). Writes
benchmarks/results/streaming.json. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import provenance

from megaedge.runtime import machine
from megaedge.runtime.streaming import StreamOptions

RESULTS = Path(__file__).resolve().parent / "results"
RATE = 16000


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def speech_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Held-out fixture clips back to back with short pauses (no endpoint fires), as long as asked."""
    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import read_set

    clips = [audio_io.load(item["path"]) for item in read_set(fixture.heldout_manifest())]
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < seconds * RATE:
        clip = clips[int(rng.integers(len(clips)))]
        parts += [clip, np.zeros(int(0.2 * RATE), np.float32)]
        total += clip.size + int(0.2 * RATE)
    return np.concatenate(parts)[: int(seconds * RATE)]


def hop_latency(tr, audio: np.ndarray, at_seconds: list[float], options: StreamOptions, probes: int = 5,
                cycle_seconds: float | None = None) -> dict:
    """Compute time of the hops of one continuous stream fed hop by hop, early and late, against a baseline that
    re-encodes and re-prefills all audio so far each hop (what upstream streaming does).

    A hop's cost is periodic, not growing: it rises while the open 8 s encoder window fills and while a span's
    committed text grows, and drops at each window boundary and span roll. So each point is reported twice: the
    ``probes`` hops right after it (phase-dependent), and the median over one whole span cycle starting there
    (``cycle_seconds``, default the span length minus its overlap), which compares like with like."""
    stream = tr.create_stream(options)
    hop = int(options.hop_seconds * RATE)
    if cycle_seconds is None:
        cycle_seconds = (options.max_span_seconds or 24.0) - options.overlap_seconds
    last_needed = max(at_seconds) + cycle_seconds
    ends, costs = [], []
    for position in range(0, min(audio.size, int(last_needed * RATE) + hop), hop):
        for event in stream.accept_waveform(audio[position : position + hop], 16000):
            if event.kind == "partial":
                ends.append(event.end)
                costs.append(event.compute_seconds)
    ends, costs = np.asarray(ends), np.asarray(costs)
    out = {}
    for point in at_seconds:
        after = costs[ends > point]
        cycle = costs[(ends > point) & (ends <= point + cycle_seconds)]
        base = []
        for k in range(3):
            so_far = audio[: int(point * RATE) + k * hop]
            t0 = time.perf_counter()
            feats = tr.encode(so_far)
            prompt = tr.prompt(feats.shape[0], None, None)
            tr.decode(prompt, feats, options.unstable_tokens + 4, ignore_eos=True)
            base.append(time.perf_counter() - t0)
        out[f"{point:g}s"] = {"stream_hop_median_s": round(float(np.median(after[:probes])), 4),
                              "stream_cycle_median_s": round(float(np.median(cycle)), 4),
                              "stream_cycle_p95_s": round(float(np.percentile(cycle, 95)), 4),
                              "cycle_hops": int(cycle.size),
                              "reencode_all_median_s": round(float(np.median(base)), 4)}
        print(f"  at {point:g} s: stream hop {np.median(after[:probes]) * 1e3:.1f} ms (next {probes}), "
              f"{np.median(cycle) * 1e3:.1f} ms (median of {cycle.size} hops over {cycle_seconds:g} s); "
              f"re-encode-all {np.median(base) * 1e3:.1f} ms", flush=True)
    out["max_span_seconds"] = options.max_span_seconds
    out["hop_seconds"] = options.hop_seconds
    out["cycle_seconds"] = cycle_seconds
    out["all_hops_median_s"] = round(float(np.median(costs)), 4)
    out["all_hops_p95_s"] = round(float(np.percentile(costs, 95)), 4)
    out["per_hop"] = [[round(float(e), 2), round(float(c), 4)] for e, c in zip(ends, costs)]
    first, last = out[f"{at_seconds[0]:g}s"], out[f"{at_seconds[-1]:g}s"]
    out["late_over_early_cycle"] = round(last["stream_cycle_median_s"] / first["stream_cycle_median_s"], 3)
    out["late_over_early_next_hops"] = round(last["stream_hop_median_s"] / first["stream_hop_median_s"], 3)
    out["baseline_late_over_early"] = round(last["reencode_all_median_s"] / first["reencode_all_median_s"], 3)
    return out


def latencies(tr, options: StreamOptions) -> dict:
    """Per held-out clip (leading 0.5 s pause, trailing 2 s pause), streamed in hop-sized feeds at real-time
    semantics: when the first partial text and the final arrive, in audio time plus compute time."""
    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import read_set

    rng = np.random.default_rng(0)
    first, final = [], []
    for item in read_set(fixture.heldout_manifest()):
        clip = audio_io.load(item["path"])
        voiced = np.flatnonzero(np.abs(clip) > 0.01)
        if voiced.size == 0:
            continue
        lead = int(0.5 * RATE)
        audio = np.concatenate([np.zeros(lead, np.float32), clip, np.zeros(2 * RATE, np.float32)])
        audio += (1e-4 * rng.standard_normal(audio.size)).astype(np.float32)
        onset, offset = (lead + voiced[0]) / RATE, (lead + voiced[-1]) / RATE
        stream = tr.create_stream(options)
        feed = int(options.hop_seconds * RATE)
        got_first = got_final = None
        for i in range(0, audio.size, feed):
            for event in stream.accept_waveform(audio[i : i + feed], 16000):
                if event.kind == "partial" and event.text and got_first is None:
                    got_first = event.end + event.compute_seconds - onset
                if event.kind == "final" and got_final is None and event.token_ids:
                    got_final = event.end + event.compute_seconds - offset
        if got_final is None:
            event = stream.final()
            got_final = event.end + event.compute_seconds - offset
        if got_first is not None:
            first.append(got_first)
        final.append(got_final)

    def stats(values):
        return {"p50_s": round(float(np.percentile(values, 50)), 3), "p95_s": round(float(np.percentile(values, 95)), 3),
                "clips": len(values)}

    return {"first_partial_after_speech_onset": stats(first), "final_after_end_of_speech": stats(final),
            "endpoint_silence_s": options.endpoint_silence_seconds}


def memory(tr, hours: float, options: StreamOptions) -> dict:
    """RSS while streaming hours of speech-with-pauses faster than real time (endpointing and span resets on)."""
    chunk = speech_audio(600.0, seed=3)
    checkpoints = sorted({600, 3600, int(hours * 3600)} - {0})
    stream = tr.create_stream(options)
    fed, out, t0, finals = 0, {}, time.perf_counter(), 0
    feed = int(options.hop_seconds * RATE)
    while fed < checkpoints[-1] * RATE:
        for i in range(0, chunk.size, feed):
            finals += sum(e.kind == "final" for e in stream.accept_waveform(chunk[i : i + feed], 16000))
        fed += chunk.size
        seconds = fed // RATE
        if seconds in checkpoints:
            out[f"{seconds}s"] = round(_rss_mib(), 1)
            print(f"  {seconds / 60:.0f} min of audio: RSS {out[f'{seconds}s']} MiB, {finals} finals, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    values = list(out.values())
    return {"rss_mib": out, "max_over_min": round(max(values) / min(values), 4), "finals": finals,
            "wall_seconds": round(time.perf_counter() - t0, 1), "hop_seconds": options.hop_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle to measure (default: the fixture, exported to a temp dir)")
    parser.add_argument("--geometry", choices=("0.6b", "1.7b"), help="also measure a random-weight geometry")
    parser.add_argument("--work", help="where to put the geometry checkpoint and bundle")
    parser.add_argument("--geometry-bundle", help="an existing bundle of that geometry (skips the export)")
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="streaming.json", help="results file under benchmarks/results (merged "
                                                                 "into what it holds)")
    parser.add_argument("--skip-fixture", action="store_true", help="measure only the geometry bundle")
    parser.add_argument("--geometry-hop", type=float, default=None,
                        help="hop seconds for the geometry bundle (default: the stream default)")
    parser.add_argument("--machine-class", help="how tables name this machine (\"2-core AMD EPYC VM (Zen 4), "
                                                "AVX512-VNNI\")")
    parser.add_argument("--engines", default="auto",
                        help="decode engines for the geometry bundle, comma-separated (auto,native,ort): an INT8 "
                             "bundle streams natively under auto, in onnxruntime's graphs under ort")
    args = parser.parse_args()
    from megaedge import fixture
    from megaedge.export.bundle import ExportOptions, export_bundle
    from megaedge.runtime.transcriber import Transcriber

    options = StreamOptions()
    placeholders = {path: "BUNDLE" for path in (args.bundle, args.geometry_bundle) if path}
    if args.work:
        placeholders[args.work] = "DIR"
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": provenance.commit(),
               "command": provenance.command(placeholders), "machine": machine.cpu_facts()["model"],
               "machine_class": args.machine_class, "threads": args.threads,
               "options": {"hop_seconds": options.hop_seconds, "unstable_tokens": options.unstable_tokens,
                           "max_span_seconds": options.max_span_seconds,
                           "endpoint_silence_seconds": options.endpoint_silence_seconds}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            bundle = Path(args.bundle)
        elif not args.skip_fixture:
            bundle = export_bundle(fixture.model_dir(), Path(tmp) / "fixture", ExportOptions(force=True))
        no_endpoint = StreamOptions(endpointing=False)
        if not args.skip_fixture:
            tr = Transcriber.from_bundle(bundle, threads=args.threads)
            print("fixture: hop latency", flush=True)
            results["fixture_hop_latency"] = hop_latency(tr, speech_audio(90.0), [10.0, 60.0], no_endpoint)
        if not args.skip_latency and not args.skip_fixture:
            print("fixture: first-partial and end-of-speech -> final latency", flush=True)
            results["fixture_latency"] = latencies(tr, options)
        if not args.skip_memory and not args.skip_fixture:
            print(f"fixture: memory over {args.hours:g} h", flush=True)
            results["fixture_memory"] = memory(tr, args.hours, replace_hop(options, 2.0))
        if args.geometry:
            from megaedge.export.factory import write_checkpoint

            if args.geometry_bundle:
                big = Path(args.geometry_bundle)
            else:
                work = Path(args.work or tmp) / args.geometry
                ckpt = write_checkpoint(work / "checkpoint", args.geometry, "mega", seed=0)
                big = export_bundle(ckpt, work / "bundle", ExportOptions(force=True))
            rng = np.random.default_rng(0)
            noise = (0.1 * rng.standard_normal(90 * RATE)).astype(np.float32)
            for engine in args.engines.split(","):
                # vad off: the decoder's cost on noise is what is measured, and the speech gate would skip it
                tr = Transcriber.from_bundle(big, threads=args.threads, verify=False, decode=engine, vad="off")
                key = f"{args.geometry}_hop_latency" + ("" if engine == "auto" else f"_{engine}")
                print(f"{args.geometry}: hop latency, decode {engine} ({'native' if tr.native else 'onnxruntime'})",
                      flush=True)
                geometry_options = replace_hop(no_endpoint, args.geometry_hop) if args.geometry_hop else no_endpoint
                results[key] = hop_latency(tr, noise, [10.0, 60.0], geometry_options, probes=3)
                results[key]["decoder"] = "native" if tr.native is not None else "onnxruntime"
                results[key]["bundle_precision"] = tr.manifest.precision
                results[key]["bundle_recipe"] = (tr.manifest.quantization or {}).get("recipe", {}).get("name")
                del tr
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / args.out
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous.update(results)
    out.write_text(json.dumps(previous, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def replace_hop(options: StreamOptions, hop: float) -> StreamOptions:
    from dataclasses import replace

    return replace(options, hop_seconds=hop)


if __name__ == "__main__":
    main()
