"""Held-out speech of megaedge's trained fixture: the command grammar, the train/test split and espeak-ng voices.

Sentences come from a small grammar (machine, line, cabin and navigation commands with numbers spelled out, as a
recogniser must write them). Audio comes from espeak-ng with several accents x voice variants x speeds x pitches.
The split is by sentence (a test sentence is never trained on) AND by voice (held-out variants and one held-out
accent appear in test only), so the fixture's figures are about generalisation, not memorisation.

training/train_fixture.py trains the fixture from this module; ``megaedge calibrate --preset eval`` synthesizes its
large evaluation set from the test side of the same split (megaedge/calibration/heldout.py).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import subprocess
from dataclasses import dataclass

import numpy as np

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    raise ValueError(n)


MACHINES = ["conveyor", "press", "pump", "mixer", "crane", "robot", "lathe", "drill", "compressor", "furnace",
            "valve", "fan", "spindle", "welder", "cutter", "boiler"]
PLACES = ["station", "gate", "dock", "bay", "line", "zone", "cell", "tank"]
CABIN = ["driver window", "passenger window", "sunroof", "trunk", "rear window", "fuel door", "mirror"]
CABIN_DEVICES = ["headlights", "wipers", "radio", "air conditioning", "seat heater", "defroster", "hazard lights",
                 "cruise control", "fog lights", "navigation"]
DESTINATIONS = ["home", "the office", "the nearest charger", "the warehouse", "the main gate", "the airport",
                "the service center", "the parking garage"]
CONTACTS = ["the supervisor", "maintenance", "the control room", "dispatch", "the shift leader", "security"]
UNITS = ["percent", "degrees", "millimeters", "seconds", "minutes", "bar", "rpm", "meters"]
AXES = ["x", "y", "z"]
DIRECTIONS = ["up", "down", "left", "right", "forward", "back"]


def _num(rng: np.random.Generator) -> str:
    roll = rng.random()
    if roll < 0.45:
        return number_words(int(rng.integers(0, 20)))
    if roll < 0.9:
        return number_words(int(rng.integers(20, 100)))
    return number_words(int(rng.integers(100, 1000)))


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _digits(rng: np.random.Generator, n: int) -> str:
    return " ".join(ONES[int(d)] for d in rng.integers(0, 10, n))


TEMPLATES = [
    lambda r: f"start {_pick(r, MACHINES)} {_num(r)}",
    lambda r: f"stop {_pick(r, MACHINES)} {_num(r)}",
    lambda r: f"set {_pick(r, MACHINES)} speed to {_num(r)} percent",
    lambda r: f"set {_pick(r, MACHINES)} {_num(r)} pressure to {_num(r)} bar",
    lambda r: f"raise temperature of {_pick(r, MACHINES)} {_num(r)} by {_num(r)} degrees",
    lambda r: f"lower {_pick(r, MACHINES)} speed by {_num(r)} rpm",
    lambda r: f"move {_pick(r, AXES)} axis {_pick(r, DIRECTIONS)} {_num(r)} millimeters",
    lambda r: f"report status of {_pick(r, PLACES)} {_num(r)}",
    lambda r: f"send the {_pick(r, MACHINES)} to {_pick(r, PLACES)} {_num(r)}",
    lambda r: f"emergency stop on {_pick(r, PLACES)} {_num(r)}",
    lambda r: f"open {_pick(r, PLACES)} {_num(r)}",
    lambda r: f"close {_pick(r, PLACES)} {_num(r)}",
    lambda r: f"wait {_num(r)} {_pick(r, ['seconds', 'minutes'])} then start {_pick(r, MACHINES)} {_num(r)}",
    lambda r: f"enter code {_digits(r, int(r.integers(3, 6)))}",
    lambda r: f"load program {_num(r)} on {_pick(r, MACHINES)} {_num(r)}",
    lambda r: f"open the {_pick(r, CABIN)}",
    lambda r: f"close the {_pick(r, CABIN)}",
    lambda r: f"turn {_pick(r, ['on', 'off'])} the {_pick(r, CABIN_DEVICES)}",
    lambda r: f"set cabin temperature to {_num(r)} degrees",
    lambda r: f"set fan speed to {_num(r)}",
    lambda r: f"volume {_pick(r, ['up', 'down'])} by {_num(r)}",
    lambda r: f"navigate to {_pick(r, DESTINATIONS)}",
    lambda r: f"call {_pick(r, CONTACTS)}",
    lambda r: f"set speed limit to {_num(r)}",
    lambda r: f"keep a distance of {_num(r)} meters",
    lambda r: "lock all doors",
    lambda r: f"unlock the {_pick(r, ['doors', 'trunk', 'fuel door'])}",
    lambda r: f"dial {_digits(r, int(r.integers(4, 8)))}",
]


def sentences(count: int, seed: int) -> list[str]:
    """``count`` distinct sentences drawn from the grammar (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    found: dict[str, None] = {}
    while len(found) < count:
        found[_pick(rng, TEMPLATES)(rng)] = None
    return list(found)


def vocabulary() -> list[str]:
    words = set(ONES) | set(TENS[2:]) | {"hundred", "and"}
    for group in (MACHINES, PLACES, CABIN, CABIN_DEVICES, DESTINATIONS, CONTACTS, UNITS, AXES, DIRECTIONS):
        for item in group:
            words.update(item.split())
    rng = np.random.default_rng(0)
    for template in TEMPLATES:
        for _ in range(50):
            words.update(template(rng).split())
    return sorted(words)


def is_test_sentence(text: str, fraction: float = 0.1) -> bool:
    """Stable sentence-level split: the same sentence is in test for every seed and every run."""
    digest = hashlib.sha256(text.encode()).digest()
    return digest[0] / 256.0 < fraction


# Voices: espeak-ng accent + variant. Test-only: the Scottish accent and variants m7 / f5 (with any accent).
TRAIN_ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-us-nyc", "en-gb-x-gbcwmd")
TEST_ACCENTS = ("en-gb-scotland",)
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m6", "f1", "f2", "f4", "klatt", "klatt3", "steph", "john", "robert")
TEST_VARIANTS = ("m7", "f5", "f3")


@dataclass(frozen=True)
class Voice:
    accent: str
    variant: str
    speed: int  # words per minute
    pitch: int  # 0..99

    @property
    def name(self) -> str:
        return f"{self.accent}+{self.variant}"


def voice_pool(split: str) -> list[tuple[str, str]]:
    if split == "train":
        return list(itertools.product(TRAIN_ACCENTS, TRAIN_VARIANTS))
    unseen_accent = list(itertools.product(TEST_ACCENTS, TRAIN_VARIANTS + TEST_VARIANTS))
    unseen_variant = list(itertools.product(TRAIN_ACCENTS, TEST_VARIANTS))
    return unseen_accent + unseen_variant


def random_voice(rng: np.random.Generator, split: str) -> Voice:
    accent, variant = _pick(rng, voice_pool(split))
    return Voice(accent, variant, int(rng.integers(135, 196)), int(rng.integers(25, 76)))


def synthesize(text: str, voice: Voice, rate: int = 16000) -> np.ndarray:
    """espeak-ng speech as float32 mono at ``rate`` with 0.1-0.3 s of leading/trailing silence."""
    import soundfile as sf
    import soxr

    cmd = ["espeak-ng", "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout", text]
    wav = subprocess.run(cmd, check=True, capture_output=True).stdout
    samples, sr = sf.read(io.BytesIO(wav), dtype="float32")
    samples = soxr.resample(samples, sr, rate).astype(np.float32)
    peak = float(np.abs(samples).max()) or 1.0
    return (0.7 * samples / peak).astype(np.float32)
