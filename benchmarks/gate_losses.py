"""Spoken commands the speech gate loses: streamed as a server's realtime session hears them, and offline.

A realtime session gets three held-out clips at a time, each followed by 1.2 s of silence, as int16 PCM in 0.1 s
blocks at 16 kHz and at 24 kHz (the OpenAI realtime rate), with the Silero gate on (the bundle's default) and the
balanced preset; a clip is lost when no non-empty final falls within it (or within 0.5 s after it), and cut when
a final of it ends over 0.3 s before the clip does (the endpointer heard silence mid-command, so that final is a
truncated, likely wrong, command). Offline, a
clip is lost when transcribing it with the gate gives '' while transcribing it without the gate does not. The
same run counts both with the gate off, which loses nothing by construction but shows what the gate costs.

``--alternatives`` also measures, at 16 kHz, an endpointer the runtime does not use: Silero's endpoints held back
while the stream's energy detector still hears sound, for up to 1.5 s, 3 s or without a limit past the endpoint,
with silent pauses and with machinery noise (hum, whine, impacts; calibration/conditions.py) at -35 dBFS under
the whole session; and the median endpoint latency (from a clip's end to its last final) of each.

    python benchmarks/gate_losses.py [--bundle B] [--rates 16000,24000] [--alternatives]

Without --bundle it exports the shipped fixture (FP32, merged). Writes benchmarks/results/gate_losses.json. The
counts do not depend on the machine (greedy decoding, a deterministic detector); they depend on the model and on
the detector, which is trained on other speech than the fixture's synthetic voices.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import provenance

RESULTS = Path(__file__).resolve().parent / "results"
GAP_SECONDS = 1.2
PER_SESSION = 3


def _pcm(samples: np.ndarray, rate: int) -> np.ndarray:
    from megaedge.runtime import audio as audio_io

    resampled = audio_io.resample(samples, 16000, rate) if rate != 16000 else samples
    return (np.clip(resampled, -1, 1) * 32767).astype("<i2")


class EnergyConfirmed:
    """The alternative endpointer (--alternatives): a stream's Silero state whose trailing silence counts only
    while the energy detector hears silence too, for at most ``extension`` samples past the endpoint."""

    def __init__(self, detector, energy, endpoint: int, extension: float):
        self.detector, self.energy, self.cap = detector, energy, endpoint + extension

    @property
    def heard_speech(self) -> bool:
        return self.detector.heard_speech

    @property
    def trailing_silence(self) -> int:
        heard = self.detector.trailing_silence
        return heard if heard >= self.cap else min(heard, self.energy.trailing_silence)

    def update(self, samples) -> None:
        self.detector.update(samples)
        self.energy.update(samples)

    def reset_utterance(self) -> None:
        self.detector.reset_utterance()
        self.energy.reset_utterance()


def _machinery(n: int, dbfs: float, seed: int) -> np.ndarray:
    from megaedge.calibration import conditions

    noise = conditions._machinery(n, 16000, np.random.default_rng(seed)).astype(np.float64)
    return noise * (10 ** (dbfs / 20) / np.sqrt(np.mean(noise * noise)))


def streamed(tr, clips: list[tuple[str, np.ndarray]], rate: int, noise_dbfs: float | None = None,
             confirm: float | None = None, references: dict | None = None) -> tuple[list, list, dict, list]:
    """Ids of the clips no non-empty final covers, and of those a final of which ends mid-clip (sessions of
    PER_SESSION clips); the min_logprob of the finals that cut a clip and of those that do not; each covered
    clip's endpoint latency (seconds from its end to the feed that produced its last final). ``noise_dbfs``:
    machinery noise under each session; ``confirm``: the EnergyConfirmed endpointer with that extension (s)."""
    from megaedge.runtime.streaming import EnergyVad, StreamOptions

    options = replace(StreamOptions.preset("balanced"), route=None)  # as serve's realtime sessions
    lost, cut, logprobs, latency = [], [], {"cut": [], "whole": [], "cut_texts": []}, []
    for first in range(0, len(clips), PER_SESSION):
        group = clips[first:first + PER_SESSION]
        parts = [np.concatenate([x, np.zeros(int(GAP_SECONDS * 16000), np.float32)]) for _, x in group]
        edges = np.cumsum([0] + [p.size for p in parts]) / 16000
        audio = np.concatenate(parts)
        if noise_dbfs is not None:
            audio = (audio + _machinery(audio.size, noise_dbfs, first)).astype(np.float32)
        audio = _pcm(audio, rate)
        stream = tr.create_stream(options)
        if confirm is not None:
            stream._vad = EnergyConfirmed(stream._vad, EnergyVad(options.vad_margin_db, options.vad_min_dbfs),
                                          round(options.endpoint_silence_seconds * 16000), confirm * 16000)
        finals = []  # (middle, end, min_logprob, emitted, text) of each non-empty final, seconds
        for i in range(0, audio.size, rate // 10):
            finals += [((e.start + e.end) / 2, e.end, e.min_logprob, (i + rate // 10) / rate, e.text)
                       for e in stream.accept_waveform(audio[i:i + rate // 10], rate) if e.kind == "final" and e.text]
        last = stream.final()
        if last.text:
            finals.append(((last.start + last.end) / 2, last.end, last.min_logprob, audio.size / rate, last.text))
        for k, (cid, x) in enumerate(group):
            mine = [f[1:] for f in finals if edges[k] <= f[0] < edges[k + 1] + 0.5]
            if not mine:
                lost.append(cid)
                continue
            clip_end = edges[k] + x.size / 16000
            if min(end for end, *_ in mine) < clip_end - 0.3:
                cut.append(cid)
            for end, lp, _, text in mine:
                logprobs["cut" if end < clip_end - 0.3 else "whole"].append(round(float(lp), 3))
                if end < clip_end - 0.3:
                    logprobs["cut_texts"].append({"id": cid, "final": text, "reference": (references or {}).get(cid)})
            latency.append(max(at for _, _, at, _ in mine) - clip_end)
    return lost, cut, logprobs, latency


def alternatives(tr, clips) -> dict:
    """At 16 kHz: Silero's endpoints alone, and held back by the energy detector, with and without noise."""
    out = {}
    for noise in (None, -35.0):
        for confirm in (None, 1.5, 3.0, 1e9):
            lost, cut, _, latency = streamed(tr, clips, 16000, noise, confirm)
            pauses = "silent pauses" if noise is None else f"machinery noise at {noise:g} dBFS"
            how = ("silero alone" if confirm is None else "energy-confirmed without a limit" if confirm > 1e6
                   else f"energy-confirmed up to {confirm:g} s")
            name = f"{pauses}, {how}"
            out[name] = {"lost": len(lost), "cut": len(cut),
                         "median_endpoint_latency_s": round(float(np.median(latency)), 2) if latency else None}
            print(f"{name}: {out[name]}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle to measure (default: the fixture, exported to a temp dir)")
    parser.add_argument("--rates", default="16000,24000", help="input rates of the streamed sessions")
    parser.add_argument("--alternatives", action="store_true",
                        help="also measure the energy-confirmed endpointer, with silent and noisy pauses")
    parser.add_argument("--out", default=str(RESULTS / "gate_losses.json"))
    args = parser.parse_args()
    from megaedge import fixture
    from megaedge.export.bundle import ExportOptions, export_bundle
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime import machine
    from megaedge.runtime.evaluate import read_set
    from megaedge.runtime.transcriber import Transcriber

    items = read_set(fixture.heldout_manifest())
    clips = [(Path(item["path"]).stem, audio_io.load(item["path"])) for item in items]
    references = {Path(item["path"]).stem: item.get("text") for item in items}
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": provenance.commit(),
               "command": "python " + " ".join(sys.argv), "machine": machine.cpu_facts()["model"],
               "clips": len(clips), "session": f"{PER_SESSION} clips, {GAP_SECONDS} s of silence after each, "
                                              "0.1 s int16 blocks, balanced preset", "streamed": {}}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else export_bundle(
            fixture.model_dir(), Path(tmp) / "fixture", ExportOptions(force=True))
        results["bundle"] = "the fixture, FP32 merged" if not args.bundle else Path(args.bundle).name
        gated = Transcriber.from_bundle(bundle, threads=2, vad="silero")
        plain = Transcriber.from_bundle(bundle, threads=2, vad="off")
        offline = [cid for cid, x in clips if not gated.transcribe(x).text and plain.transcribe(x).text]
        results["offline"] = {"lost": len(offline), "ids": offline}
        print(f"offline: {len(offline)} of {len(clips)} lost {offline}", flush=True)
        for rate in (int(r) for r in args.rates.split(",")):
            row = {}
            for name, tr in (("silero", gated), ("off", plain)):
                lost, cut, logprobs, _ = streamed(tr, clips, rate, references=references)
                whole = np.array(logprobs["whole"])
                row[name] = {"lost": len(lost), "ids": lost, "cut": len(cut), "cut_ids": cut,
                             "cut_finals": logprobs["cut_texts"], "cut_min_logprob": logprobs["cut"],
                             "whole_min_logprob_percentiles_5_25_50": np.percentile(whole, [5, 25, 50]).round(2)
                             .tolist() if whole.size else []}
                print(f"streamed at {rate} Hz, gate {name}: {len(lost)} of {len(clips)} lost {lost}, {len(cut)} cut "
                      f"{cut}", flush=True)
            results["streamed"][str(rate)] = row
        if args.alternatives:
            results["alternatives"] = alternatives(gated, clips)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
