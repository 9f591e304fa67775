"""How often a stream's final revises text its partials had committed, per preset, on the held-out clips.

A realtime client that concatenates deltas (committed text) shows what the final may still correct; this counts,
per preset, the utterances whose final disagreed with a committed token (``StreamStats.revisions``), the clips
whose last committed partial is not a prefix of the final text, and the committed tokens that stood, with the
word error rate of the finals (they are the offline transcripts, so presets only differ in their partials).

    python benchmarks/stream_revisions.py [--bundle B] [--presets balanced,interactive,dictation] [--feed 0.1]

Without --bundle it exports the shipped fixture (FP32, merged). Each clip gets 0.5 s of silence before and 1 s
after it and is fed in blocks of ``--feed`` seconds. Writes benchmarks/results/stream_revisions.json. The counts
do not depend on the machine (greedy decoding); they depend on the model: the fixture is small and trained on
single commands, so its early guesses are often wrong; ``offline`` gives its WER on the clips as cut and with the
same silence around them, which alone doubles it, and ``commands_with_pauses`` eight clean commands with 1 s
pauses, offline (one segment) and streamed (an utterance per command).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import provenance

RESULTS = Path(__file__).resolve().parent / "results"
RATE = 16000


def measure(tr, items: list[dict], preset: str, feed: float) -> dict:
    import jiwer

    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import normalize
    from megaedge.runtime.streaming import StreamOptions

    options = StreamOptions.preset(preset)
    per_group: dict[str, dict] = defaultdict(lambda: {"clips": 0, "revised": 0, "not_prefix": 0})
    refs, hyps, committed_tokens = [], [], 0
    block = int(feed * RATE)
    for item in items:
        clip = audio_io.load(item["path"])
        audio = np.concatenate([np.zeros(RATE // 2, np.float32), clip, np.zeros(RATE, np.float32)])
        stream = tr.create_stream(options)
        last = None
        finals = []
        for i in range(0, audio.size, block):
            for event in stream.accept_waveform(audio[i: i + block], RATE):
                if event.kind == "partial":
                    last = event
                else:
                    finals.append(event.text)
        finals.append(stream.final().text)
        text = " ".join(t for t in finals if t)
        group = per_group["clean" if item.get("scenario") == "clean" else "degraded"]
        group["clips"] += 1
        group["revised"] += int(stream.stats.revisions > 0)
        committed = (last.committed if last is not None else "").strip()
        group["not_prefix"] += int(bool(normalize(committed)) and not normalize(text).startswith(normalize(committed)))
        committed_tokens += len(tr.tokenizer.encode(committed, add_special_tokens=False).ids) if committed else 0
        refs.append(normalize(item["text"]))
        hyps.append(normalize(text))
    total = {key: sum(g[key] for g in per_group.values()) for key in ("clips", "revised", "not_prefix")}
    return {"options": {"hop_seconds": options.hop_seconds, "unstable_tokens": options.unstable_tokens},
            **total, "revised_share": round(total["revised"] / max(1, total["clips"]), 3),
            "not_prefix_share": round(total["not_prefix"] / max(1, total["clips"]), 3),
            "committed_tokens_at_last_partial": committed_tokens,
            "final_wer_percent": round(100 * jiwer.wer(refs, hyps), 2), "groups": dict(per_group)}


def offline(tr, items: list[dict]) -> dict:
    """Offline WER of the clips as cut and with the streams' silence around them: the model's own sensitivity to
    silence, apart from streaming (the fixture was trained on tightly cut commands)."""
    import jiwer

    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import normalize

    refs, cut, padded = [], [], []
    for item in items:
        clip = audio_io.load(item["path"])
        refs.append(normalize(item["text"]))
        cut.append(normalize(tr.transcribe(clip).text))
        audio = np.concatenate([np.zeros(RATE // 2, np.float32), clip, np.zeros(RATE, np.float32)])
        padded.append(normalize(tr.transcribe(audio).text))
    return {"wer_percent_as_cut": round(100 * jiwer.wer(refs, cut), 2),
            "wer_percent_with_0.5s_before_1s_after": round(100 * jiwer.wer(refs, padded), 2)}


def commands_with_pauses(tr, items: list[dict], count: int = 8, pause: float = 1.0) -> dict:
    """The first ``count`` clean clips joined with ``pause`` seconds of silence, as a user gives commands one after
    another: offline transcription reads them as one segment, a stream (balanced) ends an utterance at each pause."""
    import jiwer

    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import normalize
    from megaedge.runtime.streaming import StreamOptions

    chosen = [item for item in items if item.get("scenario") == "clean"][:count]
    gap = np.zeros(int(pause * RATE), np.float32)
    audio = np.concatenate([part for item in chosen for part in (audio_io.load(item["path"]), gap)])
    reference = normalize(" ".join(item["text"] for item in chosen))
    stream = tr.create_stream(StreamOptions.preset("balanced"))
    finals = []
    for i in range(0, audio.size, RATE // 10):
        finals += [e.text for e in stream.accept_waveform(audio[i: i + RATE // 10], RATE) if e.kind == "final"]
    finals.append(stream.final().text)
    return {"clips": len(chosen), "pause_seconds": pause, "audio_seconds": round(audio.size / RATE, 2),
            "offline_wer_percent": round(100 * jiwer.wer(reference, normalize(tr.transcribe(audio).text)), 2),
            "streamed_wer_percent": round(100 * jiwer.wer(reference, normalize(" ".join(t for t in finals if t))), 2),
            "streamed_finals": sum(1 for t in finals if t)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle to measure (default: the fixture, exported to a temp dir)")
    parser.add_argument("--presets", default="balanced,interactive,dictation")
    parser.add_argument("--feed", type=float, default=0.1, help="seconds of audio per accept_waveform call")
    parser.add_argument("--out", default=str(RESULTS / "stream_revisions.json"))
    args = parser.parse_args()
    from megaedge import fixture
    from megaedge.export.bundle import ExportOptions, export_bundle
    from megaedge.runtime import machine
    from megaedge.runtime.evaluate import read_set
    from megaedge.runtime.transcriber import Transcriber

    items = read_set(fixture.heldout_manifest())
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": provenance.commit(),
               "command": "python " + " ".join(sys.argv),
               "machine": machine.cpu_facts()["model"], "clips": len(items), "feed_seconds": args.feed,
               "presets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else export_bundle(
            fixture.model_dir(), Path(tmp) / "fixture", ExportOptions(force=True))
        results["bundle"] = "the fixture, FP32 merged" if not args.bundle else Path(args.bundle).name
        tr = Transcriber.from_bundle(bundle, threads=2)
        print("offline ...", flush=True)
        results["offline"] = offline(tr, items)
        results["commands_with_pauses"] = commands_with_pauses(tr, items)
        print(json.dumps(results["commands_with_pauses"]), flush=True)
        for preset in args.presets.split(","):
            print(f"{preset} ...", flush=True)
            results["presets"][preset] = measure(tr, items, preset, args.feed)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"offline": results["offline"],
                      **{p: {k: v for k, v in r.items() if k != "groups"} for p, r in results["presets"].items()}},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
