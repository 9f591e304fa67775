"""Silero VAD against the energy VAD: non-speech judged speech (must be 0) and held-out commands heard (recall).

Both offline (``has_speech`` on the whole clip) and streaming (``VadStream`` fed in hops; speech = ``heard_speech``
at any hop), per non-speech kind and per held-out condition. The FP32 fixture bundle's transcript of every missed
clip is recorded with its WER, so "no command dropped that FP32 transcribes today" can be read off. Writes
benchmarks/results/vad.json. Timings depend on the machine; the judgements do not.
Usage: python benchmarks/vad.py [--seed 0] [--durations 0.5,1,3] [--hop 0.64]
       [--fp32-bundle DIR | --fp32-texts JSON | --skip-fp32]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import provenance

from megaedge import fixture
from megaedge.calibration import nonspeech
from megaedge.runtime import audio, machine, vad

RESULTS = Path(__file__).parent / "results"


_commit = provenance.commit

def judge(engine, samples: np.ndarray, hop: int) -> tuple[bool, bool, float]:
    """(offline speech, streaming speech, compute seconds of the offline pass)."""
    t0 = time.perf_counter()
    offline = engine.has_speech(samples)
    seconds = time.perf_counter() - t0
    stream = engine.stream()
    heard = False
    for start in range(0, max(samples.size, 1), hop):
        stream.accept(samples[start : start + hop])
        heard = heard or stream.heard_speech
    return offline, heard, seconds


def _fp32_transcripts(bundle: Path | None, rows: list[dict], clips: dict) -> dict:
    from megaedge.runtime.transcriber import Transcriber

    with tempfile.TemporaryDirectory() as tmp:
        if bundle is None:
            from megaedge.export.bundle import ExportOptions, export_bundle

            print("exporting the FP32 fixture bundle", flush=True)
            bundle = export_bundle(fixture.model_dir(), Path(tmp) / "fp32", ExportOptions(force=True))
        tr = Transcriber.from_bundle(bundle, threads=1, vad="off")  # what the decoder makes of the clip ungated
        return {row["id"]: tr.transcribe(clips[row["id"]]).text for row in rows}


def _wer(ref: str, hyp: str) -> float:
    import jiwer

    return round(100 * jiwer.wer(ref, hyp), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--durations", default="0.5,1,3", help="non-speech clip durations, seconds")
    parser.add_argument("--hop", type=float, default=0.64, help="streaming feed, seconds (the stream's default hop)")
    parser.add_argument("--fp32-bundle", default=None, help="FP32 bundle for the missed clips' transcripts "
                                                            "(default: export the fixture)")
    parser.add_argument("--fp32-texts", default=None, help="JSON of FP32 transcripts made earlier, id -> text (or "
                                                           "id -> {hyp: text}), instead of transcribing here")
    parser.add_argument("--skip-fp32", action="store_true")
    parser.add_argument("--out", default="vad.json")
    args = parser.parse_args()
    hop = round(args.hop * vad.RATE)

    model = vad.installed_silero_model()
    if model is None:
        sys.exit("silero_vad is not installed: pip install --no-deps silero-vad==6.2.3")
    options = vad.VadOptions()
    engines = {"silero": vad.SileroVad(model, options), "energy": vad.EnergyVad(options)}
    corpus = nonspeech.corpus(args.seed, tuple(float(d) for d in args.durations.split(",")))
    root = fixture.heldout_manifest().parent
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    clips = {row["id"]: audio.read_file(root / row["path"]) for row in rows}

    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _commit(),
        "command": " ".join(["python", *sys.argv]),
        "machine": {**machine.cpu_facts(), "python": platform.python_version()},
        "onnxruntime": __import__("onnxruntime").__version__,
        "silero_model": {"file": model.name, "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
                         "package_version": _package_version("silero-vad")},
        "options": {k: getattr(options, k) for k in options.__dataclass_fields__},
        "streaming_hop_seconds": args.hop,
    }
    audio_seconds = (sum(c.samples.size for c in corpus) + sum(x.size for x in clips.values())) / vad.RATE
    for name, engine in engines.items():
        print(f"{name}: {len(corpus)} non-speech clips, {len(rows)} held-out clips", flush=True)
        compute = 0.0
        nonspeech_rows = defaultdict(lambda: {"clips": 0, "speech_offline": 0, "speech_streaming": 0})
        judged_speech = []
        for clip in corpus:
            offline, streaming, seconds = judge(engine, clip.samples, hop)
            compute += seconds
            entry = nonspeech_rows[clip.kind]
            entry["clips"] += 1
            entry["speech_offline"] += offline
            entry["speech_streaming"] += streaming
            if offline or streaming:
                judged_speech.append(clip.name)
        heldout_rows = defaultdict(lambda: {"clips": 0, "heard_offline": 0, "heard_streaming": 0})
        missed = []
        for row in rows:
            offline, streaming, seconds = judge(engine, clips[row["id"]], hop)
            compute += seconds
            for key in (row["scenario"], "all"):
                heldout_rows[key]["clips"] += 1
                heldout_rows[key]["heard_offline"] += offline
                heldout_rows[key]["heard_streaming"] += streaming
            if not (offline and streaming):
                missed.append({"id": row["id"], "scenario": row["scenario"], "text": row["text"],
                               "offline": offline, "streaming": streaming})
        for entry in heldout_rows.values():
            entry["recall_offline_pct"] = round(100 * entry["heard_offline"] / entry["clips"], 1)
            entry["recall_streaming_pct"] = round(100 * entry["heard_streaming"] / entry["clips"], 1)
        results[name] = {
            "nonspeech": dict(nonspeech_rows), "nonspeech_judged_speech": judged_speech,
            "nonspeech_clips": len(corpus), "heldout": dict(heldout_rows), "heldout_missed": missed,
            "compute_seconds_per_audio_second": round(compute / audio_seconds, 5),
        }
    if not args.skip_fp32:
        if args.fp32_texts:
            loaded = json.loads(Path(args.fp32_texts).read_text())
            texts = {k: v["hyp"] if isinstance(v, dict) else v for k, v in loaded.items()}
            results["fp32_texts_from"] = str(args.fp32_texts)
        else:
            texts = _fp32_transcripts(Path(args.fp32_bundle) if args.fp32_bundle else None, rows, clips)
            results["fp32_texts_from"] = str(args.fp32_bundle or "fixture exported by this run")
        results["fp32_texts"] = texts
        for name in engines:
            for miss in results[name]["heldout_missed"]:
                miss["fp32_text"] = texts[miss["id"]]
                miss["fp32_wer_pct"] = _wer(miss["text"], texts[miss["id"]])
            results[name]["dropped_that_fp32_transcribes_exactly"] = sum(
                m["fp32_wer_pct"] == 0 for m in results[name]["heldout_missed"])
    _print(results, list(engines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / args.out}")


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _print(results: dict, names: list[str]) -> None:
    print("\nnon-speech judged speech (offline / streaming), must be 0")
    print(f"{'kind':18s}" + "".join(f"{n:>18s}" for n in names))
    for kind in nonspeech.KINDS:
        cells = []
        for n in names:
            e = results[n]["nonspeech"][kind]
            cells.append(f"{e['speech_offline']}/{e['speech_streaming']} of {e['clips']}")
        print(f"{kind:18s}" + "".join(f"{c:>18s}" for c in cells))
    print("\nheld-out recall % (offline / streaming), must be 100")
    print(f"{'condition':26s}" + "".join(f"{n:>18s}" for n in names))
    for key in sorted(results[names[0]]["heldout"], key=lambda k: k == "all"):
        cells = []
        for n in names:
            e = results[n]["heldout"][key]
            cells.append(f"{e['recall_offline_pct']:g}/{e['recall_streaming_pct']:g} of {e['clips']}")
        print(f"{key:26s}" + "".join(f"{c:>18s}" for c in cells))
    for n in names:
        print(f"\n{n}: {results[n]['compute_seconds_per_audio_second']:.4f} s compute per s of audio; missed:")
        for m in results[n]["heldout_missed"]:
            print(f"  {m['id']:16s} {m['text']!r} -> FP32 {m.get('fp32_text', '?')!r} (WER {m.get('fp32_wer_pct')})")


if __name__ == "__main__":
    main()
