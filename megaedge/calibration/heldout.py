"""Held-out speech for ``megaedge calibrate --preset eval`` without ``--speech``: the fixture's test sentences in
its test voices, synthesized with espeak-ng, or, where espeak-ng is missing, the clean clips shipped with the
fixture (fewer utterances: the set then re-degrades the same 28 clips at more severities and seeds, and says so).

Only sentences and voices the fixture never trained on are used: the same sentence hash and voice split as
training/train_fixture.py, and, as there, only test sentences whose words occur in the training sentences (a
closed-vocabulary model cannot write a word it never heard).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaedge.calibration import speech

log = logging.getLogger("megaedge.calibration.heldout")

# How training/train_fixture.py drew its sentences (seed 0, a pool of 12000, the first 7000 training utterances).
FIXTURE_SEED = 0
FIXTURE_POOL = 12000
FIXTURE_TRAIN_UTTERANCES = 7000
SYNTH_UTTERANCES = 600  # distinct (sentence, voice) pairs; the eval set degrades each a few times


@functools.lru_cache(maxsize=1)
def test_sentences() -> tuple[str, ...]:
    pool = speech.sentences(FIXTURE_POOL, FIXTURE_SEED)
    train = [s for s in pool if not speech.is_test_sentence(s)]
    seen = {w for i in range(FIXTURE_TRAIN_UTTERANCES) for w in train[i % len(train)].split()}
    return tuple(s for s in pool if speech.is_test_sentence(s) and all(w in seen for w in s.split()))


@dataclass(frozen=True)
class Utterance:
    text: str
    voice: speech.Voice
    lead: int  # samples of leading / trailing silence and level in dB, as training varies them
    tail: int
    gain_db: float

    @property
    def label(self) -> str:
        return f"{self.voice.name} {self.voice.speed}wpm p{self.voice.pitch}"


def plan(count: int = SYNTH_UTTERANCES, seed: int = 0) -> list[Utterance]:
    """Which sentence in which test voice: deterministic for (count, seed), without running espeak-ng."""
    sentences = test_sentences()
    rng = np.random.default_rng([seed, 31])
    order = rng.permutation(len(sentences))
    out = []
    for i in range(count):
        voice = speech.random_voice(rng, "test")
        lead, tail = (int(v) for v in rng.integers(800, 5000, 2))
        out.append(Utterance(sentences[int(order[i % len(order)])], voice, lead, tail, float(rng.uniform(-14, 0))))
    return out


def espeak_version() -> str | None:
    """espeak-ng's version line, or None where it is not installed (the version keys the cache: another
    espeak-ng speaks differently)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    try:
        return subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def render(utterance: Utterance, rate: int) -> np.ndarray:
    audio = speech.synthesize(utterance.text, utterance.voice, rate)
    audio = np.pad(audio, (utterance.lead, utterance.tail)) * float(10 ** (utterance.gain_db / 20))
    return audio.astype(np.float32)


def synthesized(count: int, seed: int, rate: int, version: str):
    """The espeak-ng held-out speech as a builder.SpeechSet (nothing is synthesized until it is loaded)."""
    from megaedge.calibration.builder import SpeechSet, SpeechSource

    utterances = plan(count, seed)
    digest = hashlib.sha256(json.dumps([version, rate, [(u.text, u.label, u.lead, u.tail, round(u.gain_db, 6))
                                                          for u in utterances]]).encode()).hexdigest()

    def load(max_seconds: float):
        from concurrent.futures import ThreadPoolExecutor

        from megaedge.progress import track

        # espeak-ng runs as a subprocess per sentence: two at a time keep both cores of a small machine busy.
        with ThreadPoolExecutor(max_workers=2) as pool:
            audios = list(track(pool.map(lambda u: render(u, rate), utterances), desc="espeak-ng",
                                total=len(utterances), unit="utt"))
        return [(SpeechSource(Path(f"espeak-ng/{i:04d}"), u.text, u.label, "espeak-ng"), a[: int(max_seconds * rate)])
                for i, (u, a) in enumerate(zip(utterances, audios))]

    return SpeechSet(f"espeak-ng held-out speech: {count} utterances of the fixture's test sentences and voices "
                     f"({version})", digest, load)


def shipped(rate: int):
    """The shipped held-out set's clean clips as a builder.SpeechSet: the only clean held-out speech there is
    without espeak-ng."""
    from megaedge.calibration.builder import SpeechSet, SpeechSource
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import read_set

    items = [item for item in read_set(fallback_manifest()) if item.get("scenario") == "clean"]
    digest = hashlib.sha256()
    for item in items:
        digest.update(item["text"].encode() + hashlib.sha256(Path(item["path"]).read_bytes()).digest())
    origin = FALLBACK_ORIGIN

    def load(max_seconds: float):
        return [(SpeechSource(Path(item["path"]), item["text"], item.get("voice"), origin),
                 audio_io.read_file(item["path"], rate)[: int(max_seconds * rate)]) for item in items]

    return SpeechSet(f"{len(items)} shipped held-out clean clips re-degraded (espeak-ng not installed, so fewer "
                     "distinct utterances than the espeak-ng set)", digest.hexdigest(), load)


FALLBACK_ORIGIN = "shipped held-out clean clip (espeak-ng not installed)"


def heldout_speech(seed: int, rate: int, count: int = SYNTH_UTTERANCES):
    """espeak-ng speech where espeak-ng is installed, else the shipped clean clips (logged as a warning)."""
    version = espeak_version()
    if version is None:
        log.warning("espeak-ng is not installed: the evaluation set re-degrades the fixture's %s instead of "
                    "synthesizing held-out speech (apt-get install espeak-ng for the full set)", "28 clean clips")
        return shipped(rate)
    return synthesized(count, seed, rate, version)


def fallback_manifest() -> Path:
    from megaedge import fixture

    return fixture.heldout_manifest()
