"""Router decisions on audio of any length (torch and ONNX routers share these rules).

Upstream's router has a sinusoidal table of 850 rows (40 ms each), so it crashes on inputs >= 34.0 s and routes
whole files only. megaedge scores audio that fits the table in one pass (exactly upstream's computation) and longer
audio in equal windows of at most ``WINDOW_SECONDS``; the file-level degraded probability
is the duration-weighted mean of the window probabilities (the max is reported too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SAMPLE_RATE = 16000
HOP = 160
DOWNSAMPLE = 4  # two stride-2 convolutions
WINDOW_SECONDS = 30.0
DEFAULT_THRESHOLD = 0.5


def max_router_samples(position_rows: int) -> int:
    """Longest input (samples) whose downsampled frame count fits ``position_rows`` positions."""
    # mel frames = 1 + n // HOP; positions = ceil(ceil(frames / 2) / 2) = ceil(frames / 4)
    max_frames = position_rows * DOWNSAMPLE
    return (max_frames - 1) * HOP + (HOP - 1)


def windows(num_samples: int, position_rows: int = 850) -> list[tuple[int, int]]:
    """Sample ranges to score: one range for short audio, else equal windows of <= WINDOW_SECONDS."""
    if num_samples <= max_router_samples(position_rows):
        return [(0, num_samples)]
    limit = min(int(WINDOW_SECONDS * SAMPLE_RATE), max_router_samples(position_rows))
    count = math.ceil(num_samples / limit)
    bounds = [round(i * num_samples / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass(frozen=True)
class RouterDecision:
    degraded_prob: float  # duration-weighted mean over windows
    max_prob: float
    window_probs: tuple[float, ...]
    window_bounds: tuple[tuple[int, int], ...]
    threshold: float

    @property
    def use_lora(self) -> bool:
        return self.degraded_prob >= self.threshold

    @property
    def route(self) -> str:
        return "lora" if self.use_lora else "base"


def aggregate(probs: list[float], bounds: list[tuple[int, int]], threshold: float = DEFAULT_THRESHOLD) -> RouterDecision:
    lengths = [max(end - start, 1) for start, end in bounds]
    mean = sum(p * n for p, n in zip(probs, lengths)) / sum(lengths)
    return RouterDecision(float(mean), float(max(probs)), tuple(float(p) for p in probs), tuple(bounds), threshold)
