"""The seven atomic acoustic conditions. Each is ``f(audio, sr, severity, rng, info=None) -> audio``.

``severity`` in [0, 1] maps to physical units documented per function; ``rng`` (numpy Generator) makes every random
choice, so the same seed gives identical output. When ``info`` is a dict it receives the measured parameters (SNR,
RT60, drop fraction, ...) that the calibration manifest records. Outputs are float32, finite, peak <= 1.0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from megaedge.calibration import rooms
from megaedge.errors import MegaedgeError

NOISE_TYPES = ("white", "pink", "brown", "babble", "machinery", "vehicle")
PACKET_MS = 20.0


def _check(severity: float) -> float:
    if not 0.0 <= float(severity) <= 1.0:
        raise MegaedgeError(f"severity {severity} is outside [0, 1]; use a value between 0 (mild) and 1 (extreme)")
    return float(severity)


def _lerp(lo: float, hi: float, severity: float) -> float:
    return lo + (hi - lo) * severity


def _power(x: np.ndarray) -> float:
    return float(np.mean(np.asarray(x, dtype=np.float64) ** 2)) + 1e-20


def _peak_limit(x: np.ndarray, ceiling: float = 0.99) -> tuple[np.ndarray, float]:
    """Scale down (never up) so the peak stays <= ceiling; returns the gain used."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    gain = min(1.0, ceiling / peak) if peak > 0 else 1.0
    return (x * gain).astype(np.float32), gain


def _record(info: dict | None, **values) -> None:
    if info is not None:
        info.update({k: (round(float(v), 4) if isinstance(v, (float, np.floating)) else v) for k, v in values.items()})


# ------------------------------------------------------------------------------------------------------ noise
def _shaped_noise(n: int, rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Noise with power spectrum ~ 1/f^exponent (0 white, 1 pink, 2 brown), DC removed."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n)
    freqs[0] = freqs[1] if n > 1 else 1.0
    spectrum *= freqs ** (-exponent / 2.0)
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n)


def _babble(audio: np.ndarray, rng: np.random.Generator, talkers: int = 6) -> np.ndarray:
    """Several time-shifted, reversed and pitch-shifted copies of speech: intelligible-free but speech-shaped."""
    n = audio.size
    out = np.zeros(n)
    for _ in range(talkers):
        src = audio[::-1] if rng.random() < 0.5 else audio
        rate = rng.uniform(0.85, 1.2)
        positions = (np.arange(n) * rate) % max(n - 1, 1)
        voice = np.interp(positions, np.arange(n), src)
        out += np.roll(voice, int(rng.integers(0, max(n, 1)))) * rng.uniform(0.5, 1.0)
    return out


def _machinery(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / sr
    mains = rng.choice([50.0, 60.0])
    hum = sum(np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 8))
    rpm_hz = rng.uniform(15, 40)
    whine = 0.3 * np.sin(2 * np.pi * rpm_hz * 12 * t) * (1 + 0.2 * np.sin(2 * np.pi * rpm_hz * t))
    impulses = np.zeros(n)
    period = int(sr * rng.uniform(0.25, 1.0))
    decay = np.exp(-np.arange(int(0.05 * sr)) / (0.008 * sr))
    for start in range(int(rng.integers(0, max(period, 1))), n, max(period, 1)):
        burst = rng.standard_normal(decay.size) * decay * rng.uniform(2, 5)
        impulses[start : start + burst.size] += burst[: max(0, n - start)]
    return hum + whine + impulses + 0.3 * _shaped_noise(n, rng, 1.0) / 10


def _vehicle(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    t = np.arange(n) / sr
    rumble = sosfilt(butter(4, 180, "low", fs=sr, output="sos"), _shaped_noise(n, rng, 2.0))
    rumble /= np.sqrt(_power(rumble))
    engine_hz = rng.uniform(25, 60)
    engine = sum(np.sin(2 * np.pi * engine_hz * k * t + rng.uniform(0, 6.3)) / k**1.5 for k in (1, 2, 4))
    tyres = sosfilt(butter(2, [400, 1500], "band", fs=sr, output="sos"), rng.standard_normal(n))
    tyres /= np.sqrt(_power(tyres))
    return rumble + 0.4 * engine + 0.15 * tyres


def make_noise(kind: str, audio: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    n = audio.size
    if kind == "white":
        return rng.standard_normal(n)
    if kind == "pink":
        return _shaped_noise(n, rng, 1.0)
    if kind == "brown":
        return _shaped_noise(n, rng, 2.0)
    if kind == "babble":
        return _babble(audio, rng)
    if kind == "machinery":
        return _machinery(n, sr, rng)
    if kind == "vehicle":
        return _vehicle(n, sr, rng)
    raise MegaedgeError(f"noise type {kind!r} is not one of {NOISE_TYPES}")


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """speech + noise scaled to exactly ``snr_db`` (power ratio over the whole clip), then peak-limited."""
    gain = np.sqrt(_power(speech) / (_power(noise) * 10 ** (snr_db / 10)))
    mixed, _ = _peak_limit(speech + gain * noise)
    return mixed


def additive_noise(audio, sr, severity, rng, info=None, noise_type: str | None = None):
    """Ambient noise at the microphone. Severity 0: SNR +30 dB (barely audible); 1: SNR -5 dB (noise louder than
    speech). Types: white, pink, brown, babble (mixed speech), machinery (mains hum + harmonics + impacts), vehicle
    cabin (low-frequency rumble + engine orders + tyre noise)."""
    severity = _check(severity)
    kind = noise_type or str(rng.choice(NOISE_TYPES))
    snr = _lerp(30.0, -5.0, severity)
    noise = make_noise(kind, audio, sr, rng)
    out = mix_at_snr(audio, noise, snr)
    _record(info, noise_type=kind, snr_db=snr)
    return out


# ------------------------------------------------------------------------------------------------------- room
def far_field(audio, sr, severity, rng, info=None):
    """Talker away from the microphone in a room. Severity 0: 0.5 m; 1: 8 m (distance grows geometrically). Level
    falls as 1/distance (re 0.5 m) and the direct-to-reverberant ratio falls with distance (RT60 0.3-0.8 s)."""
    severity = _check(severity)
    distance = 0.5 * (16.0**severity)
    rt60 = float(rng.uniform(0.3, 0.8))
    room = rooms.room_impulse(rng, sr, rt60, distance)
    wet = rooms.convolve(audio, room.rir)
    # Same power as the dry talker at 0.5 m, then the 1/distance law of a point source.
    wet *= np.sqrt(_power(audio) / _power(wet)) * (0.5 / room.distance)
    out, _ = _peak_limit(wet)
    _record(info, distance_m=room.distance, rt60_s=rt60, drr_db=room.drr_db)
    return out


def reverberation(audio, sr, severity, rng, info=None):
    """Echo and reverberation. Severity 0: RT60 0.2 s; 1: RT60 1.5 s, plus up to 3 discrete echoes (50-300 ms,
    -12 to -3 dB as severity rises). ``rt60_measured_s`` is measured (Schroeder) on the room response; the discrete
    echoes are reported separately, since a strong late echo is not part of the diffuse decay."""
    severity = _check(severity)
    rt60 = _lerp(0.2, 1.5, severity)
    room = rooms.room_impulse(rng, sr, rt60, distance=float(rng.uniform(1.0, 3.0)))
    rir = room.rir.astype(np.float64)
    measured = rooms.schroeder_rt60(rir, sr)
    echoes = []
    for _ in range(int(round(severity * 3))):
        delay = int(rng.uniform(0.05, 0.3) * sr)
        gain = 10 ** (_lerp(-12.0, -3.0, severity) / 20) * rng.uniform(0.7, 1.0)
        peak = int(np.argmax(np.abs(rir)))
        if peak + delay < rir.size:
            rir[peak + delay] += gain
            echoes.append({"delay_ms": round(delay / sr * 1000, 1), "gain_db": round(float(20 * np.log10(gain)), 1)})
    wet = rooms.convolve(audio, rir)
    wet *= np.sqrt(_power(audio) / _power(wet))
    out, _ = _peak_limit(wet)
    _record(info, rt60_s=rt60, rt60_measured_s=measured, drr_db=room.drr_db, echoes=echoes)
    return out


def obstruction(audio, sr, severity, rng, info=None):
    """Speech through a barrier (door, panel, helmet). Severity 0: low-pass at 7 kHz, 0 dB loss; 1: low-pass at 400 Hz
    with 20 dB broadband transmission loss (the barrier passes lows, absorbs highs)."""
    from scipy.signal import butter, sosfilt

    severity = _check(severity)
    cutoff = 7000.0 * (400.0 / 7000.0) ** severity
    loss_db = 20.0 * severity
    order = int(rng.integers(2, 5))
    muffled = sosfilt(butter(order, cutoff, "low", fs=sr, output="sos"), audio.astype(np.float64))
    out, _ = _peak_limit(muffled * 10 ** (-loss_db / 20))
    _record(info, cutoff_hz=cutoff, transmission_loss_db=loss_db, filter_order=order)
    return out


# ------------------------------------------------------------------------------------------- recording chain
def recording_artifacts(audio, sr, severity, rng, info=None):
    """Recorder problems; 2-4 of: clipping (input gain 0 -> +20 dB into a hard clip at full scale), DC offset
    (0 -> 0.1 FS), AGC pumping (gain riding the envelope, depth 0 -> 12 dB), hiss (-70 -> -25 dBFS), crosstalk (another
    talker at -30 -> -6 dB). Clipping is the one artifact whose output reaches full scale."""
    severity = _check(severity)
    x = audio.astype(np.float64).copy()
    kinds = [str(k) for k in rng.choice(["clipping", "dc_offset", "agc", "hiss", "crosstalk"],
                                        size=int(rng.integers(2, 5)), replace=False)]
    applied: dict = {}
    if "crosstalk" in kinds:
        other = np.roll(x[::-1], int(rng.integers(0, max(x.size, 1))))
        level = _lerp(-30.0, -6.0, severity)
        x = x + other * np.sqrt(_power(x) / _power(other)) * 10 ** (level / 20)
        applied["crosstalk_db"] = level
    if "agc" in kinds:
        depth = _lerp(0.0, 12.0, severity)
        env = np.sqrt(np.convolve(x**2, np.ones(int(0.05 * sr)) / int(0.05 * sr), mode="same") + 1e-9)
        env = env / (env.max() + 1e-12)
        gain_db = -depth * env + depth / 2
        gain_db = np.convolve(gain_db, np.ones(int(0.2 * sr)) / int(0.2 * sr), mode="same")  # slow release
        x = x * 10 ** (gain_db / 20)
        applied["agc_depth_db"] = depth
    if "hiss" in kinds:
        level = _lerp(-70.0, -25.0, severity)
        x = x + rng.standard_normal(x.size) * 10 ** (level / 20)
        applied["hiss_dbfs"] = level
    if "dc_offset" in kinds:
        offset = _lerp(0.0, 0.1, severity) * rng.choice([-1.0, 1.0])
        x = x + offset
        applied["dc_offset"] = offset
    x, _ = _peak_limit(x)
    if "clipping" in kinds:
        drive_db = _lerp(0.0, 20.0, severity)
        driven = x * 10 ** (drive_db / 20) / max(float(np.max(np.abs(x))), 1e-9)
        clipped = np.clip(driven, -1.0, 1.0)
        applied["clip_drive_db"] = drive_db
        applied["clipped_fraction"] = float(np.mean(np.abs(driven) >= 1.0))
        x = clipped
    _record(info, artifacts=sorted(kinds), **applied)
    return x.astype(np.float32)


def electronic_distortion(audio, sr, severity, rng, info=None):
    """Electronics between microphone and recorder; 2-4 of: saturation (tanh drive 1 -> 10), bit-crush (14 -> 4 bits)
    or mu-law codec quantization, mains hum 50/60 Hz with harmonics (-50 -> -12 dB re speech), telephone band
    (300-3400 Hz band-pass, 16 kHz kept)."""
    from scipy.signal import butter, sosfilt

    severity = _check(severity)
    x = audio.astype(np.float64).copy()
    kinds = [str(k) for k in rng.choice(["saturation", "quantization", "hum", "telephone"],
                                        size=int(rng.integers(2, 5)), replace=False)]
    applied: dict = {}
    if "telephone" in kinds:
        x = sosfilt(butter(4, [300, 3400], "band", fs=sr, output="sos"), x)
        applied["band_hz"] = [300, 3400]
    if "hum" in kinds:
        mains = float(rng.choice([50.0, 60.0]))
        t = np.arange(x.size) / sr
        hum = sum(np.sin(2 * np.pi * mains * k * t) / k for k in (1, 2, 3, 5))
        level = _lerp(-50.0, -12.0, severity)
        x = x + hum * np.sqrt(_power(x) / _power(hum)) * 10 ** (level / 20)
        applied.update(hum_hz=mains, hum_db=level)
    if "saturation" in kinds:
        drive = _lerp(1.0, 10.0, severity)
        x = np.tanh(drive * x / max(float(np.max(np.abs(x))), 1e-9)) / np.tanh(drive)
        applied["saturation_drive"] = drive
    if "quantization" in kinds:
        x, _ = _peak_limit(x)
        if rng.random() < 0.5:
            bits = int(round(_lerp(14.0, 4.0, severity)))
            step = 2.0 / 2**bits
            x = np.round(x / step) * step
            applied["bits"] = bits
        else:
            mu = 255.0
            levels = int(round(_lerp(256.0, 16.0, severity)))
            comp = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
            comp = np.round((comp + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1
            x = np.sign(comp) * ((1 + mu) ** np.abs(comp) - 1) / mu
            applied["mulaw_levels"] = levels
    out, _ = _peak_limit(x)
    _record(info, distortions=sorted(kinds), **applied)
    return out


def transmission_dropout(audio, sr, severity, rng, info=None):
    """Lost packets on a radio / VoIP link, in 20 ms frames. Severity 0: no loss; 1: 40% of frames lost. Losses come
    in bursts (geometric lengths, mean 1 -> 6 frames); each burst is zeroed (packet loss), repeats the last good
    frame (stutter) or, for long bursts, is a zeroed span. ``drop_fraction`` is exact to one frame."""
    severity = _check(severity)
    frame = int(PACKET_MS * 1e-3 * sr)
    n_frames = audio.size // frame
    target = int(round(0.4 * severity * n_frames))
    lost = np.zeros(n_frames, dtype=bool)
    bursts = []
    mean_burst = _lerp(1.0, 6.0, severity)
    while lost.sum() < target:
        length = int(min(rng.geometric(1.0 / mean_burst), target - lost.sum()))
        start = int(rng.integers(0, n_frames))
        span = [i for i in range(start, min(start + length, n_frames)) if not lost[i]]
        if not span:
            continue
        lost[span] = True
        bursts.append((span[0], len(span)))
    out = audio.astype(np.float32).copy()
    kinds = {"zero": 0, "stutter": 0, "span": 0}
    for start, length in sorted(bursts):
        kind = "span" if length >= 8 else str(rng.choice(["zero", "stutter"]))
        kinds[kind] += length
        for i in range(start, start + length):
            seg = slice(i * frame, (i + 1) * frame)
            if kind == "stutter" and i > 0:
                out[seg] = out[(i - 1) * frame : i * frame]
            else:
                out[seg] = 0.0
    _record(info, drop_fraction=float(lost.sum()) / max(n_frames, 1), target_fraction=0.4 * severity,
            bursts=len(bursts), frames_zeroed=kinds["zero"] + kinds["span"], frames_repeated=kinds["stutter"])
    return out


ATOMIC: dict[str, Callable] = {
    "noise": additive_noise,
    "far_field": far_field,
    "obstruction": obstruction,
    "reverberation": reverberation,
    "recording": recording_artifacts,
    "distortion": electronic_distortion,
    "dropout": transmission_dropout,
}
