"""Voice-activity detection: is there speech in this audio, and where. numpy + onnxruntime only.

Two engines with one interface, so callers can switch with ``VadOptions.engine``:

* ``SileroVad``: Silero VAD (v6, MIT) as an ONNX graph on onnxruntime. It tells speech from non-speech that is loud
  and stationary (tones, hum, DC, machinery, vehicle cabins), which an energy detector cannot. Where its model comes
  from: the bundle's graph "vad" (``megaedge export`` copies it in, so a device needs nothing extra), else an
  installed ``silero_vad`` package (``pip install --no-deps silero-vad``; located, never imported: importing it
  imports torch).
* ``EnergyVad``: 20 ms frame energy against a tracked noise floor (the streaming endpointer's original logic). Kept as
  the fallback where no Silero model is available, and as the cheap choice.

Both turn per-frame speech decisions into regions with the same state machine (``_Tracker``): a region opens when a
frame's probability reaches ``threshold`` and closes after ``min_silence_seconds`` below ``threshold - 0.15``
(hysteresis, so a probability hovering at the threshold does not flicker); regions shorter than
``min_speech_seconds`` are dropped; kept regions are padded by ``speech_pad_seconds``. The offline ``speech_regions``
runs exactly the streaming ``VadStream`` over the whole clip, so both agree.

A loaded VAD is read-only and shared (onnxruntime sessions are thread-safe); per-stream state lives in ``VadStream``.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaedge.errors import BundleError, MegaedgeError

log = logging.getLogger("megaedge.runtime.vad")

RATE = 16000
ENGINES = ("auto", "silero", "energy")
HYSTERESIS = 0.15  # a region ends below threshold - HYSTERESIS (Silero's own recipe uses the same gap)
SILERO_FRAME = 512  # samples per Silero step at 16 kHz (32 ms); the model is trained on exactly this
SILERO_CONTEXT = 64  # the previous step's last samples, prepended: without them the model outputs ~0 on speech
SILERO_PACKAGE_MODEL = ("data", "silero_vad.onnx")  # inside the silero_vad package directory
ENERGY_FRAME = 320  # 20 ms
AGC_TARGET_DBFS = -20.0  # frame RMS Silero's input is lifted towards (a normal speaking level)
AGC_DECAY_DB = 3.0  # per second: slow, so the gain does not swell in the pauses between words
AGC_FLOOR = 1e-9
_AGC_TARGET = 10 ** (AGC_TARGET_DBFS / 20)
_AGC_DECAY_PER_FRAME = 10 ** (-AGC_DECAY_DB / 20 * SILERO_FRAME / RATE)


@dataclass(frozen=True)
class VadOptions:
    """``engine``: "silero", "energy" or "auto" (Silero when a model is found, else energy, logged once).
    ``threshold`` (0.05-0.95): speech probability that opens a region; it closes below threshold - 0.15.
    ``min_speech_seconds`` (0-5): shorter regions are not speech (a click, a 0.05 s blip).
    ``min_silence_seconds`` (0-5): a pause shorter than this stays inside the region (gaps between words).
    ``speech_pad_seconds`` (0-1): kept regions grow by this on both sides (soft word onsets and tails).
    ``max_gain_db`` (0-40): the most the Silero engine's level control boosts quiet audio (never attenuates).
    ``energy_margin_db`` (0-60) / ``energy_min_dbfs`` (-100-0): the energy engine's speech test, a frame this far
    above the tracked noise floor and above this absolute level."""

    engine: str = "auto"
    # 0.35, not Silero's usual 0.5: on the held-out set 0.5 misses clipped (recording) and distorted commands that
    # 0.35 hears, while no non-speech clip of the corpus (calibration/nonspeech.py) goes above 0.27 (mains hum).
    threshold: float = 0.35
    # 0.25 s: shorter than any spoken command word with its vowel, longer than 0.05 s blips and single clicks.
    min_speech_seconds: float = 0.25
    min_silence_seconds: float = 0.3
    speech_pad_seconds: float = 0.1
    # Silero's input gain rides up to this on quiet audio (a far-field command at -50 dBFS reads 0.49 raw, 0.99
    # boosted); a cap, so a silent microphone's noise is not raised to speech level.
    max_gain_db: float = 20.0
    energy_margin_db: float = 12.0
    energy_min_dbfs: float = -55.0

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise MegaedgeError(f"VAD engine {self.engine!r} is not one of {ENGINES}")
        checks = (("threshold", self.threshold, 0.05, 0.95), ("min_speech_seconds", self.min_speech_seconds, 0, 5),
                  ("min_silence_seconds", self.min_silence_seconds, 0, 5),
                  ("speech_pad_seconds", self.speech_pad_seconds, 0, 1), ("max_gain_db", self.max_gain_db, 0, 40),
                  ("energy_margin_db", self.energy_margin_db, 0, 60),
                  ("energy_min_dbfs", self.energy_min_dbfs, -100, 0))
        from megaedge.runtime.limits import LimitError, _float

        for name, value, lo, hi in checks:
            try:
                number = _float(value, f"VAD {name}")  # '0.3' from a config file is 0.3; True, 'abc', NaN are not
            except LimitError as exc:
                raise MegaedgeError(f"{exc}; the default is {getattr(VadOptions, name)}") from None
            if not lo <= number <= hi:
                raise MegaedgeError(f"VAD {name} {number:g} is outside {lo}-{hi}; "
                                    f"the default is {getattr(VadOptions, name)}")
            object.__setattr__(self, name, number)  # frozen: the checked number replaces what was given

    @classmethod
    def preset(cls, name: str) -> VadOptions:
        if name not in PRESETS:
            raise MegaedgeError(f"VAD preset {name!r} is not one of {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS = {
    "balanced": VadOptions(),
    # Loud plants: a higher bar before a region opens, longer minimum speech; costs recall on whispered commands.
    "strict": VadOptions(threshold=0.5, min_speech_seconds=0.35),
    "energy": VadOptions(engine="energy"),
}


# ------------------------------------------------------------------------------------------------ region tracking
class _Tracker:
    """Per-frame speech probabilities -> regions in samples. Shared by both engines and by offline and streaming."""

    def __init__(self, options: VadOptions, frame: int, keep: int | None = None):
        self.frame = frame
        self.keep = keep  # closed regions kept (None: all); a live stream needs only the last, to merge with
        self.on, self.off = options.threshold, max(0.0, options.threshold - HYSTERESIS)
        self.min_speech = round(options.min_speech_seconds * RATE)
        self.min_silence = round(options.min_silence_seconds * RATE)
        self.pad = round(options.speech_pad_seconds * RATE)
        self.position = 0  # samples judged so far (whole frames)
        self.start: int | None = None  # open region's first sample
        self.last_voiced = 0  # end of the open region's last frame at or above the off threshold
        self.regions: list[tuple[int, int]] = []  # kept, padded (the end may pass the audio's end), closed

    def push(self, prob: float) -> None:
        begin, end = self.position, self.position + self.frame
        self.position = end
        if self.start is None:
            if prob >= self.on:
                self.start, self.last_voiced = begin, end
        elif prob >= self.off:
            self.last_voiced = end
        elif end - self.last_voiced >= self.min_silence:
            self._close()

    def _close(self) -> None:
        start, end = self.start, self.last_voiced
        self.start = None
        if end - start < self.min_speech:
            return
        lo = max(0, start - self.pad)
        if self.regions and lo <= self.regions[-1][1]:  # padding made it touch the previous region: one region
            lo = self.regions.pop()[0]
        self.regions.append((lo, end + self.pad))
        if self.keep is not None and len(self.regions) > self.keep:
            del self.regions[0]

    @property
    def open_speech(self) -> int:
        """Samples of the open region so far (0 when none)."""
        return 0 if self.start is None else self.last_voiced - self.start

    def finish(self, total: int) -> list[tuple[int, int]]:
        """Close the open region at the end of the audio; pads are clipped to ``total`` samples."""
        if self.start is not None:
            self._close()
        return [(lo, min(hi, total)) for lo, hi in self.regions]


class VadStream:
    """One stream's VAD state. ``accept`` -> per-frame probabilities; ``heard_speech`` and ``trailing_silence``
    (samples) drive endpointing like streaming's energy VAD; ``regions`` are the closed speech regions so far (the
    last ``keep_regions`` of them: a microphone's stream, open for weeks, keeps one)."""

    def __init__(self, engine, options: VadOptions, keep_regions: int | None = None):
        self._engine = engine
        self.options = options
        self._tracker = _Tracker(options, engine.frame, keep_regions)
        self._rest = np.zeros(0, np.float32)
        self._state = engine._initial_state()
        self.samples = 0  # stream time: samples accepted
        self.heard_speech = False
        self.trailing_silence = 0

    def accept(self, samples: np.ndarray) -> list[float]:
        """Feed 16 kHz mono float samples (any length); returns the probabilities of the frames completed."""
        samples = np.asarray(samples, np.float32).reshape(-1)
        self.samples += samples.size
        data = np.concatenate([self._rest, samples]) if self._rest.size else samples
        usable = data.size // self._engine.frame * self._engine.frame
        self._rest = data[usable:].copy()
        probs, self._state = self._engine._frame_probs(data[:usable], self._state)
        t = self._tracker
        for p in probs:
            t.push(p)
            if t.start is not None and p >= t.off:
                self.trailing_silence = 0
                # Heard speech only once the region is as long as a kept one: a blip never arms the endpointer.
                self.heard_speech = self.heard_speech or t.open_speech >= t.min_speech
            else:
                self.trailing_silence += t.frame
        return [float(p) for p in probs]

    update = accept  # the name streaming's EnergyVad uses

    def reset_utterance(self) -> None:
        """A new utterance starts: forget ``heard_speech`` and ``trailing_silence`` (regions and frame state stay)."""
        self.heard_speech = False
        self.trailing_silence = 0

    @property
    def in_speech(self) -> bool:
        return self._tracker.start is not None

    @property
    def regions(self) -> list[tuple[int, int]]:
        return list(self._tracker.regions)

    def finish(self) -> list[tuple[int, int]]:
        """End of audio: close the open region; returns the stream's regions (start, end) in samples (all of them,
        or the last ``keep_regions``)."""
        return self._tracker.finish(self.samples)


class _Engine:
    name = "?"
    frame = 0

    def __init__(self, options: VadOptions):
        self.options = options

    def stream(self, keep_regions: int | None = None) -> VadStream:
        return VadStream(self, self.options, keep_regions)

    def speech_regions(self, samples16k: np.ndarray) -> list[tuple[int, int]]:
        """(start_sample, end_sample) of each speech region of a whole clip (16 kHz mono)."""
        stream = self.stream()
        stream.accept(samples16k)
        return stream.finish()

    def has_speech(self, samples16k: np.ndarray) -> bool:
        """True when the clip has a speech region of at least ``min_speech_seconds`` (before padding)."""
        return bool(self.speech_regions(samples16k))

    def _initial_state(self):
        raise NotImplementedError

    def _frame_probs(self, frames: np.ndarray, state):
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ Silero
def _session(path_or_session):
    import onnxruntime as ort

    if not isinstance(path_or_session, (str, Path)):
        # A bundle graph the transcriber opened (runtime/session.OrtSession) wraps the InferenceSession.
        return getattr(path_or_session, "session", path_or_session)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # A 2 MB recurrent net on 32 ms steps: one thread is fastest, and spinning threads would steal cores from the
    # ASR graphs that share the machine.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path_or_session), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"{path_or_session}: onnxruntime cannot load this VAD model "
                          f"({str(exc).splitlines()[0]})") from exc


class SileroVad(_Engine):
    """Silero VAD v5/v6 ONNX (inputs ``input`` [batch, 64 + 512], ``state`` [2, batch, 128], ``sr`` int64;
    outputs ``output`` [batch, 1] speech probability, ``stateN``)."""

    name = "silero"
    frame = SILERO_FRAME

    def __init__(self, model_path_or_session, options: VadOptions = VadOptions()):
        super().__init__(options)
        self.session = _session(model_path_or_session)
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != {"input", "state", "sr"} or len(outputs) != 2:
            raise BundleError(f"VAD model has inputs {sorted(inputs)} and outputs {outputs}; expected Silero v5/v6 "
                              f"(input, state, sr -> output, stateN): use silero_vad/data/silero_vad.onnx")
        self._outputs = outputs
        self._sr = np.array(RATE, np.int64)

    def _initial_state(self):
        return np.zeros((2, 1, 128), np.float32), np.zeros(SILERO_CONTEXT, np.float32), AGC_FLOOR

    def _frame_probs(self, frames: np.ndarray, state):
        rnn, context, level = state
        probs = []
        max_gain = 10 ** (self.options.max_gain_db / 20)
        for i in range(0, frames.size, SILERO_FRAME):
            # Causal level control, the same offline and streaming: the level follows each frame's RMS up at once
            # and decays AGC_DECAY_DB per second, and the gain lifts it to AGC_TARGET_DBFS (at most max_gain).
            frame = frames[i : i + SILERO_FRAME]
            rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64))))
            level = max(level * _AGC_DECAY_PER_FRAME, rms, AGC_FLOOR)
            gain = min(max_gain, max(1.0, _AGC_TARGET / level))
            if gain != 1.0:
                frame = frame * np.float32(gain)
            feed = {"input": np.concatenate([context, frame])[None], "state": rnn, "sr": self._sr}
            prob, rnn = self.session.run(self._outputs, feed)
            probs.append(float(prob.reshape(-1)[0]))
            context = frame[-SILERO_CONTEXT:]
        return probs, (rnn, context, level)


# ------------------------------------------------------------------------------------------------ energy
class EnergyVad(_Engine):
    """20 ms frame energy against a noise floor that follows quiet frames at once and rises 0.02 dB per frame (so
    speech never becomes the floor); a frame is speech (probability 1) when it is ``energy_margin_db`` above the
    floor and above ``energy_min_dbfs``."""

    name = "energy"
    frame = ENERGY_FRAME

    def _initial_state(self):
        return -70.0

    def _frame_probs(self, frames: np.ndarray, floor_db):
        if not frames.size:
            return [], floor_db
        blocks = frames.reshape(-1, ENERGY_FRAME).astype(np.float64)
        probs = []
        for energy in 10.0 * np.log10(np.mean(blocks * blocks, axis=1) + 1e-12):
            floor_db = energy if energy < floor_db else floor_db + 0.02
            probs.append(1.0 if energy > max(floor_db + self.options.energy_margin_db,
                                             self.options.energy_min_dbfs) else 0.0)
        return probs, floor_db


# ------------------------------------------------------------------------------------------------ choosing
def installed_silero_model() -> Path | None:
    """silero_vad.onnx of an installed ``silero_vad`` package, found without importing it (that imports torch)."""
    try:
        spec = importlib.util.find_spec("silero_vad")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder, *SILERO_PACKAGE_MODEL)
        if path.is_file():
            return path
    return None


def load(bundle_dir=None, manifest_info=None, options: VadOptions = VadOptions()) -> tuple[_Engine, str]:
    """The VAD to use and a one-line reason: the bundle's "vad" graph, else an installed silero_vad package, else
    (engine "auto") the energy VAD, logged once at INFO. Engine "silero" with no model raises."""
    if options.engine == "energy":
        return EnergyVad(options), "energy VAD: chosen by options"
    if bundle_dir is not None and manifest_info is not None and "vad" in manifest_info.graphs:
        path = Path(bundle_dir) / manifest_info.graphs["vad"].file
        return SileroVad(path, options), f"Silero VAD from the bundle ({path.name})"
    path = installed_silero_model()
    if path is not None:
        return SileroVad(path, options), f"Silero VAD from the installed silero_vad package ({path})"
    if options.engine == "silero":
        raise MegaedgeError("VAD engine 'silero' needs a model: the bundle has no vad graph and silero_vad is not "
                            "installed; re-export the bundle or pip install --no-deps silero-vad==6.2.3")
    reason = ("energy VAD: no Silero model (the bundle has no vad graph and silero_vad is not installed); "
              "tones, hum and machinery noise can pass as speech")
    log.info(reason)
    return EnergyVad(options), reason
