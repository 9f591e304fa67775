"""Compound scenarios: named, physically ordered chains of atomic conditions.

Physical order of a signal path: source -> room (far-field or reverberation, never both: each is a full room) ->
obstruction -> microphone (ambient noise arrives here) -> recording -> electronics -> transmission. Every
combination of 2 or 3 atomic conditions that respects this (50 of them) is a scenario named by its stages joined with
'+', plus named field scenarios of 4-5 stages with a fixed noise type: at least 54, as in the Mega-ASR paper.
A scenario is reproducible from (name, severity, seed).
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field

import numpy as np

from megaedge.calibration.conditions import ATOMIC
from megaedge.errors import MegaedgeError

# Stage order along the signal path; far_field and reverberation share the "room" stage.
STAGE = {"far_field": 0, "reverberation": 0, "obstruction": 1, "noise": 2, "recording": 3, "distortion": 4,
         "dropout": 5}


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[str, ...]
    options: dict = field(default_factory=dict)  # per-step keyword arguments, e.g. {"noise": {"noise_type": ...}}
    description: str = ""


def _combinations() -> list[Scenario]:
    found = []
    for size in (2, 3):
        for combo in itertools.combinations(sorted(ATOMIC, key=lambda c: (STAGE[c], c)), size):
            stages = [STAGE[c] for c in combo]
            if len(set(stages)) != len(stages):  # two rooms at once is not a physical path
                continue
            found.append(Scenario("+".join(combo), combo))
    return found


FIELD_SCENARIOS = (
    Scenario("factory_floor", ("far_field", "noise", "recording", "distortion"), {"noise": {"noise_type": "machinery"}},
             "operator several metres from a panel microphone among machines"),
    Scenario("vehicle_handsfree_call", ("reverberation", "noise", "distortion", "dropout"),
             {"noise": {"noise_type": "vehicle"}}, "cabin hands-free over a cellular link"),
    Scenario("warehouse_radio", ("far_field", "obstruction", "noise", "distortion", "dropout"),
             {"noise": {"noise_type": "machinery"}}, "talk-back radio in a hall, behind racks"),
    Scenario("canteen_intercom", ("reverberation", "noise", "recording", "distortion"),
             {"noise": {"noise_type": "babble"}}, "intercom in a crowded hard-walled room"),
)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [*_combinations(), *FIELD_SCENARIOS]}


def get(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise MegaedgeError(f"unknown scenario {name!r}; valid: {', '.join(sorted(SCENARIOS))}")
    return SCENARIOS[name]


def scenario_rng(name: str, seed: int) -> np.random.Generator:
    """Generator seeded by (name, seed) so a scenario is reproducible independent of what ran before it."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def apply(name: str, audio: np.ndarray, sr: int, severity: float, seed: int, info: dict | None = None) -> np.ndarray:
    """Run a scenario's chain; each stage gets the severity jittered by +-0.1 (clipped to [0, 1])."""
    scenario = get(name)
    rng = scenario_rng(name, seed)
    out = np.asarray(audio, dtype=np.float32)
    stages = []
    for step in scenario.steps:
        stage_severity = float(np.clip(severity + rng.uniform(-0.1, 0.1), 0.0, 1.0))
        stage_info: dict = {}
        out = ATOMIC[step](out, sr, stage_severity, rng, stage_info, **scenario.options.get(step, {}))
        stages.append({"condition": step, "severity": round(stage_severity, 4), **stage_info})
    if info is not None:
        info["stages"] = stages
    return out


def apply_atomic(condition: str, audio: np.ndarray, sr: int, severity: float, seed: int,
                 info: dict | None = None) -> np.ndarray:
    if condition not in ATOMIC:
        raise MegaedgeError(f"unknown condition {condition!r}; valid: {', '.join(ATOMIC)}")
    return ATOMIC[condition](np.asarray(audio, dtype=np.float32), sr, severity, scenario_rng(condition, seed), info)
