"""A deterministic corpus of audio that holds no speech, for checking that nothing in it becomes text.

Issue 28 class 4: offline, only exact digital zeros were gated, so a silent 16-bit microphone, mains hum or a machine
came out as a confident command. Every clip here must give no text (and no VAD speech), offline and streaming.

Kinds (``KINDS``), each at every duration of ``DURATIONS`` unless noted; levels are RMS dBFS with full scale = 1.0:

* ``digital_silence``: exact zeros.
* ``lsb_noise``: a silent 16-bit microphone, int16 values in {-1, 0, 1} / 32768.
* ``noise_60dbfs``: white noise at -60 dBFS.
* ``hum``: 50 and 60 Hz mains with harmonics 1-7 (amplitude 1/k), at -30 and -10 dBFS.
* ``dc``: a constant offset (0.1 and -0.5) plus the LSB noise of a real converter.
* ``tone``: 1 kHz sine at -20 and -3 dBFS.
* ``square``: 100 Hz and 1 kHz square waves at amplitude 0.25.
* ``machinery``: mains hum + motor whine + periodic impacts (conditions._machinery), at -30 and -10 dBFS.
* ``vehicle``: cabin rumble + engine orders + tyre noise (conditions._vehicle), at -30 and -10 dBFS.
* ``one_sample``: a clip of a single sample (0.5 and -1.0); no duration.
* ``blip``: 0.05 s cut from the loudest part of held-out speech clips, alone and placed at a random point of
  digital silence of each duration.

The same seed gives the same clips, bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaedge.calibration import conditions
from megaedge.errors import MegaedgeError

RATE = 16000
KINDS = ("digital_silence", "lsb_noise", "noise_60dbfs", "hum", "dc", "tone", "square", "machinery", "vehicle",
         "one_sample", "blip")
DURATIONS = (0.5, 1.0, 3.0)
BLIP_SECONDS = 0.05
LSB = 1.0 / 32768
BLIP_SOURCES = ("clean-000", "clean-002", "noise-000")  # held-out clips the blips are cut from


@dataclass(frozen=True)
class NonSpeechClip:
    kind: str  # one of KINDS
    name: str  # kind and parameters, unique within a corpus
    samples: np.ndarray  # float32, 16 kHz mono

    @property
    def seconds(self) -> float:
        return self.samples.size / RATE


def _rms_to(x: np.ndarray, dbfs: float) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x * (10 ** (dbfs / 20) / np.sqrt(np.mean(x * x) + 1e-30))
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def _lsb_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return (rng.integers(-1, 2, n) * LSB).astype(np.float32)


def _speech_blips(heldout_dir: Path) -> list[tuple[str, np.ndarray]]:
    """0.05 s from the loudest 0.05 s window of each of BLIP_SOURCES (a syllable's vowel, the most speech-like part)."""
    from megaedge.runtime import audio as audio_io

    n = round(BLIP_SECONDS * RATE)
    rows = {}
    for line in (heldout_dir / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["id"]] = row
    blips = []
    for clip_id in BLIP_SOURCES:
        if clip_id not in rows:
            raise MegaedgeError(f"{heldout_dir}: held-out clip {clip_id} is missing; reinstall megaedge")
        speech = audio_io.read_file(heldout_dir / rows[clip_id]["path"])
        energy = np.convolve(speech.astype(np.float64) ** 2, np.ones(n), "valid")
        start = int(np.argmax(energy))
        blips.append((clip_id, speech[start : start + n].copy()))
    return blips


def corpus(seed: int = 0, durations=DURATIONS, heldout_dir: str | Path | None = None) -> list[NonSpeechClip]:
    """Every non-speech clip: KINDS x levels x ``durations`` (one_sample has none), deterministic from ``seed``."""
    if not durations or any(not 0.05 <= float(d) <= 600 for d in durations):
        raise MegaedgeError(f"non-speech durations {tuple(durations)} must each be 0.05-600 s")
    if heldout_dir is None:
        from megaedge import fixture

        heldout_dir = fixture.heldout_manifest().parent
    rng = np.random.default_rng(seed)
    clips: list[NonSpeechClip] = []

    def add(kind: str, name: str, samples: np.ndarray) -> None:
        clips.append(NonSpeechClip(kind, name, np.asarray(samples, np.float32)))

    blips = _speech_blips(Path(heldout_dir))
    for seconds in durations:
        n = round(float(seconds) * RATE)
        t = np.arange(n) / RATE
        tag = f"{float(seconds):g}s"
        add("digital_silence", f"digital_silence {tag}", np.zeros(n))
        add("lsb_noise", f"lsb_noise {tag}", _lsb_noise(n, rng))
        add("noise_60dbfs", f"noise_60dbfs {tag}", _rms_to(rng.standard_normal(n), -60))
        for mains in (50, 60):
            hum = sum(np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 8))
            for level in (-30, -10):
                add("hum", f"hum {mains} Hz {level} dBFS {tag}", _rms_to(hum, level))
        for offset in (0.1, -0.5):
            add("dc", f"dc {offset:g} {tag}", offset + _lsb_noise(n, rng))
        for level in (-20, -3):
            add("tone", f"tone 1 kHz {level} dBFS {tag}", _rms_to(np.sin(2 * np.pi * 1000 * t), level))
        for freq in (100, 1000):
            add("square", f"square {freq} Hz {tag}", 0.25 * np.sign(np.sin(2 * np.pi * freq * t + 0.1)))
        for kind, make in (("machinery", conditions._machinery), ("vehicle", conditions._vehicle)):
            noise = make(n, RATE, rng)
            for level in (-30, -10):
                add(kind, f"{kind} {level} dBFS {tag}", _rms_to(noise, level))
        for clip_id, blip in blips:
            at = int(rng.integers(0, max(n - blip.size, 0) + 1))
            placed = np.zeros(max(n, blip.size), np.float32)
            placed[at : at + blip.size] = blip
            add("blip", f"blip from {clip_id} in silence {tag}", placed)
    for value in (0.5, -1.0):
        add("one_sample", f"one_sample {value:g}", np.array([value]))
    for clip_id, blip in blips:
        add("blip", f"blip from {clip_id} alone", blip)
    return clips
