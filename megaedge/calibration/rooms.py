"""Room impulse responses: geometric early reflections from pyroomacoustics plus a diffuse tail of exact RT60.

The image-source method needs orders in the hundreds for RT60 ~1.5 s (far too slow), so rooms are simulated with a
low image-source order for the direct path and early reflections, and the late field is an exponentially decaying
noise tail (-60 dB at RT60), the standard hybrid. The tail level follows diffuse-field theory: reverberant energy
equals the direct energy at the critical distance r_c = 0.057 sqrt(V / RT60), which gives realistic
direct-to-reverberant ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPEED_OF_SOUND = 343.0


@dataclass(frozen=True)
class RoomImpulse:
    rir: np.ndarray
    rt60: float  # target RT60 of the tail (s)
    distance: float  # source-microphone distance (m)
    drr_db: float  # measured direct-to-reverberant ratio


def critical_distance(volume: float, rt60: float) -> float:
    return 0.057 * np.sqrt(volume / rt60)


def direct_to_reverberant_db(rir: np.ndarray, sr: int, window_ms: float = 2.5) -> float:
    peak = int(np.argmax(np.abs(rir)))
    half = int(window_ms * 1e-3 * sr)
    direct = np.sum(rir[max(peak - half, 0) : peak + half + 1] ** 2)
    rest = np.sum(rir**2) - direct
    return float(10 * np.log10(direct / max(rest, 1e-20)))


def schroeder_rt60(rir: np.ndarray, sr: int, start_db: float = -5.0, end_db: float = -25.0) -> float:
    """RT60 from Schroeder backward integration, line fit between ``start_db`` and ``end_db`` (T20 by default)."""
    energy = np.cumsum((rir.astype(np.float64) ** 2)[::-1])[::-1]
    edc = 10 * np.log10(energy / energy[0] + 1e-300)
    idx = np.where((edc <= start_db) & (edc >= end_db))[0]
    if idx.size < 2:
        return float("nan")
    slope, _ = np.polyfit(idx / sr, edc[idx], 1)
    return float(-60.0 / slope)


def room_impulse(
    rng: np.random.Generator, sr: int, rt60: float, distance: float, room_dim: tuple[float, float, float] | None = None,
    max_order: int = 3,
) -> RoomImpulse:
    import pyroomacoustics as pra

    if room_dim is None:
        room_dim = (float(rng.uniform(5, 12)), float(rng.uniform(4, 9)), float(rng.uniform(2.6, 4.0)))
    # The microphone sits mid-room, so the room must be wider than twice the talker distance (plus wall clearance).
    room_dim = tuple(max(d, 2.0 * distance + 1.0) if i < 2 else d for i, d in enumerate(room_dim))
    absorption, _ = pra.inverse_sabine(rt60, list(room_dim))
    absorption = float(np.clip(absorption, 0.01, 1.0))
    room = pra.ShoeBox(list(room_dim), fs=sr, materials=pra.Material(absorption), max_order=max_order)
    mic = np.array([room_dim[0] * 0.5, room_dim[1] * 0.5, 1.2])
    angle = rng.uniform(0, 2 * np.pi)
    source = mic + np.array([np.cos(angle) * distance, np.sin(angle) * distance, rng.uniform(0.0, 0.4)])
    source = np.clip(source, 0.2, np.array(room_dim) - 0.2)
    room.add_source(source.tolist())
    room.add_microphone(mic.tolist())
    room.compute_rir()
    early = np.asarray(room.rir[0][0], dtype=np.float64)
    true_distance = float(np.linalg.norm(source - mic))

    # Diffuse tail: starts after the early part, decays 60 dB in rt60, energy set by the critical distance.
    volume = float(np.prod(room_dim))
    peak = int(np.argmax(np.abs(early)))
    direct_energy = float(np.sum(early[max(peak - 40, 0) : peak + 41] ** 2))
    r_c = critical_distance(volume, rt60)
    tail_energy = direct_energy * (true_distance / r_c) ** 2
    length = int(rt60 * 1.2 * sr) + peak
    t = np.arange(length - peak) / sr
    onset = np.minimum(t / 0.01, 1.0)  # 10 ms fade-in so the tail does not add a second "direct" peak
    tail = rng.standard_normal(t.size) * np.exp(-6.9078 * t / rt60) * onset
    tail *= np.sqrt(tail_energy / max(np.sum(tail**2), 1e-20))
    rir = np.zeros(max(length, early.size))
    rir[: early.size] += early
    rir[peak : peak + tail.size] += tail
    rir /= np.max(np.abs(rir))
    return RoomImpulse(rir.astype(np.float32), rt60, true_distance, direct_to_reverberant_db(rir, sr))


def convolve(audio: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Same-length convolution aligned on the direct path (no added delay)."""
    from scipy.signal import oaconvolve

    delay = int(np.argmax(np.abs(rir)))
    wet = oaconvolve(audio.astype(np.float64), rir.astype(np.float64))
    return wet[delay : delay + audio.size]
