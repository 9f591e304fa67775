"""Chunked streaming: partial results every hop, exact finals, and a cost per hop that does not grow with the stream.

One ``Transcriber`` holds the weights; each ``Stream`` holds only its own state:

* front-end: log-mel frames are computed once, as soon as the samples they need have arrived (bit-identical to the
  offline front-end; its clip-wide floor is applied when a window is encoded, and windows encoded under an older
  floor are re-encoded if a louder frame later raises it);
* encoder: finished 104-token windows (800 mel frames) are encoded once and kept; each hop encodes only the open
  window;
* decoder: the KV cache of the prompt prefix and of the finished windows' audio tokens is kept; each hop prefills
  the open window's audio tokens, the prompt suffix and the committed text, then decodes a few tokens; the last
  ``unstable_tokens`` of each hypothesis are rolled back, the rest are committed;
* final: one prefill checks every committed token against the full audio (``logits_at`` returns their logits), so
  the final transcript is exactly the offline greedy one. A committed token is revised only if the full audio
  disagrees with it; ``StreamStats.revisions`` counts that;
* endpointing: an energy VAD finalises an utterance after trailing silence and starts a fresh one (routed bundles
  route each utterance);
* exact long-form (``segment_seconds``, the ``exact`` preset): the stream is cut where offline transcription cuts
  its segments (the quietest frame before each limit, runtime/segmenting.py), and each part's final is the offline
  segment's, so the finals of any length of audio are exactly ``transcribe``'s segments;
* long-form: after ``max_span_seconds`` the span is finalised at a window boundary and a new one starts with an
  audio overlap and the recent text as context; words the overlap repeats are dropped, so state stays bounded.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from megaedge.errors import MegaedgeError
from megaedge.runtime import audio as audio_io
from megaedge.runtime import decoding, features, segmenting
from megaedge.runtime.text import max_new_tokens_for

log = logging.getLogger("megaedge.runtime.streaming")

RATE = features.SAMPLE_RATE
PIECE = RATE // 10  # samples fed through the stream's checks at a time (0.1 s), whatever the caller's block
_HALF_WINDOW = features.N_FFT // 2


# StreamOptions' numbers: (low, high, int or float, None allowed)
_RANGES = {
    "hop_seconds": (0.02, 30.0, float, False),
    "unstable_tokens": (0, 64, int, False),
    "endpoint_silence_seconds": (0.1, 30.0, float, False),
    "vad_margin_db": (0.0, 60.0, float, False),
    "vad_min_dbfs": (-120.0, 0.0, float, False),
    "max_span_seconds": (9.0, 300.0, float, True),
    "overlap_seconds": (0.0, 4.0, float, False),
    "context_chars": (0, 2000, int, False),
    "segment_seconds": (8.0, 300.0, float, True),
}


@dataclass(frozen=True)
class StreamOptions:
    # 0.64 s: 4 encoder tokens' worth of audio; benchmarks/streaming.py measures the hop cost it buys.
    hop_seconds: float = 0.64
    unstable_tokens: int = 5
    endpointing: bool = True
    endpoint_silence_seconds: float = 0.8
    vad_margin_db: float = 12.0  # speech: frame energy this far above the tracked noise floor
    vad_min_dbfs: float = -55.0  # ... and above this absolute level
    # long-form: finalise the span at the window boundary after this. A hop's cost rises within a span (committed
    # text and KV grow) and drops at each roll; 24 s (3 windows) bounds it (benchmarks/streaming.py measures it).
    max_span_seconds: float | None = 24.0
    overlap_seconds: float = 1.0
    context_chars: int = 120
    # exact long-form: cut as offline segments are (None: no cuts); excludes max_span_seconds
    segment_seconds: float | None = None
    language: str | None = None
    context: str | None = None
    route: str | None = None  # None: the transcriber's route
    loop_guard: bool = True

    def __post_init__(self):
        # Every value is checked here, type and range: a wrong one failed mid-stream (TypeError) or ran (a negative
        # endpoint silence ended an utterance at every piece).
        optional_note = {"max_span_seconds": " or None (with segment_seconds)",
                         "segment_seconds": " or None (with max_span_seconds)"}
        for name, (low, high, kind, optional) in _RANGES.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            whole = kind is int
            # numbers.*: numpy scalars count (a value read from an array); bool does not
            ok = (not isinstance(value, (bool, np.bool_)) and isinstance(value, numbers.Integral if whole else
                                                                          numbers.Real)
                  and math.isfinite(value) and low <= value <= high)
            if not ok:
                example = getattr(StreamOptions, name)
                raise MegaedgeError(f"{name} {value!r} is not {'a whole number' if whole else 'a number'} in "
                                    f"{low:g}-{high:g}{optional_note.get(name, '')}; e.g. {example}")
            object.__setattr__(self, name, kind(value))  # a plain int or float, whatever number it was given as
        for name in ("endpointing", "loop_guard"):
            if not isinstance(getattr(self, name), bool):
                raise MegaedgeError(f"{name} {getattr(self, name)!r} is not True or False")
        for name in ("language", "context", "route"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise MegaedgeError(f"{name} {getattr(self, name)!r} is not a string or None")
        if self.segment_seconds is not None and (self.max_span_seconds is not None or not
                                                 8.0 <= self.segment_seconds <= 300.0):
            raise MegaedgeError(f"segment_seconds {self.segment_seconds} must be 8-300 s and comes without "
                                f"max_span_seconds (set that to None); e.g. 30, as offline transcription cuts")
        if self.max_span_seconds is None and self.segment_seconds is None:
            raise MegaedgeError("max_span_seconds and segment_seconds are both None: a stream's state would grow "
                                "without bound; set one (e.g. max_span_seconds=24, or segment_seconds=30)")
        if self.max_span_seconds is not None and self.max_span_seconds < 8.0 + self.overlap_seconds:
            raise MegaedgeError(f"max_span_seconds {self.max_span_seconds} is shorter than one encoder window "
                                f"(8 s) plus the overlap; use >= {8.0 + self.overlap_seconds:g}, or None with "
                                "segment_seconds")

    @classmethod
    def preset(cls, name: str) -> StreamOptions:
        if not isinstance(name, str) or name not in PRESETS:
            raise MegaedgeError(f"stream preset {name!r} is not one of {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS = {
    "balanced": StreamOptions(),
    "interactive": StreamOptions(hop_seconds=0.48, endpoint_silence_seconds=0.6),
    "dictation": StreamOptions(hop_seconds=1.0, endpoint_silence_seconds=1.2, unstable_tokens=6),
    # finals == offline transcription, segment by segment
    "exact": StreamOptions(endpointing=False, max_span_seconds=None,
                           segment_seconds=segmenting.DEFAULT_SEGMENT_SECONDS),
}


@dataclass(frozen=True)
class StreamEvent:
    kind: str  # "partial" | "final"
    text: str
    committed: str  # partial: the part that will not change until the final check
    start: float  # seconds of stream time
    end: float
    utterance: int
    route: str
    token_ids: tuple[int, ...]
    compute_seconds: float
    reason: str = ""  # final: "endpoint" | "flush" | "span" | "segment"
    # finals: the mean and lowest log-probability of its tokens, as offline transcription gives them
    mean_logprob: float | None = None
    min_logprob: float | None = None
    degraded_prob: float | None = None  # routed bundles, route auto: the router's degraded probability
    language: str | None = None  # finals: the language the model named (or the one forced)
    # finals: the log-probability of each of token_ids; partials: of each committed token (the first
    # len(logprobs) of token_ids), as the hop that committed it scored it
    logprobs: tuple[float, ...] = ()


@dataclass
class StreamStats:
    """Counters of one stream since it was created or reset; the per-hop series keep the last ``STATS_KEPT`` hops,
    so that a microphone left open for weeks holds a bounded amount of them."""

    hops: int = 0
    encoder_windows: int = 0  # window encodings (finished + open) across hops
    reencoded_windows: int = 0  # finished windows encoded again because the clip-wide mel floor rose
    revisions: int = 0  # finals where the full audio disagreed with a committed token
    reroutes: int = 0  # utterances whose final route differed from the provisional one
    hop_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=STATS_KEPT))  # each hop's compute
    tail_rows: deque[int] = field(default_factory=lambda: deque(maxlen=STATS_KEPT))  # prompt rows after the KV cache


STATS_KEPT = 10_000  # hops: hours of a stream's recent history


class EnergyVad:
    """20 ms frame energy against a tracked noise floor; counts trailing non-speech after speech."""

    FRAME = 320

    def __init__(self, margin_db: float, min_dbfs: float):
        self.margin_db, self.min_dbfs = margin_db, min_dbfs
        self.floor_db = -70.0
        self.rest = np.zeros(0, np.float32)
        self.heard_speech = False
        self.trailing_silence = 0  # samples

    def reset_utterance(self) -> None:
        self.heard_speech = False
        self.trailing_silence = 0

    def update(self, samples: np.ndarray) -> None:
        data = np.concatenate([self.rest, samples])
        usable = data.size // self.FRAME * self.FRAME
        self.rest = data[usable:]
        frames = data[:usable].reshape(-1, self.FRAME).astype(np.float64)
        for energy in 10.0 * np.log10(np.mean(frames * frames, axis=1) + 1e-12):
            # The floor follows quiet frames at once and rises slowly, so speech never becomes the floor.
            self.floor_db = energy if energy < self.floor_db else self.floor_db + 0.02
            if energy > max(self.floor_db + self.margin_db, self.min_dbfs):
                self.heard_speech = True
                self.trailing_silence = 0
            else:
                self.trailing_silence += self.FRAME


class _Span:
    """State of one decoding span: its samples, mel frames, encoded windows and decoder caches."""

    def __init__(self, start_sample: int, context: str | None, gate: float | None):
        self.start_sample = start_sample  # stream time of samples[0]
        self.samples = np.zeros(0, np.float32)
        self.raw = np.zeros((features.ASR_MEL_BINS, 0), np.float32)  # log10 mel, floor not yet applied
        self.max = -np.inf
        self.windows: list[tuple[np.ndarray, float]] = []  # (audio features [104, H], floor max used)
        self.kv: int | None = None  # length of the stream's decoder cache after prefix + windows[:kv_windows]
        self.kv_windows = 0
        self.committed: list[int] = []
        self.committed_logprobs: list[float] = []  # of each committed token, from the hop that committed it
        self.previous: list[int] = []  # the last hop's full hypothesis
        self.after_cut = False  # begins where an exact long-form segment was cut (Stream._cut_segment)
        self.context = context
        self.gate = gate
        self.route_checked = False
        self.degraded_prob: float | None = None


def _one_caller(method):
    """A stream's state is one caller's at a time: a second thread entering while the first is inside gets an
    error at once, not a silently wrong final or an obscure failure in the decoder."""
    import functools

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if not self._feeding.acquire(blocking=False):
            raise MegaedgeError(f"{method.__name__}(): this stream is in {self._feeding_in}() on another thread; one "
                                "stream is fed by one thread at a time: give each thread its own (create_stream)")
        self._feeding_in = method.__name__
        try:
            return method(self, *args, **kwargs)
        finally:
            self._feeding.release()

    return guarded


class Stream:
    """Per-stream state over a shared ``Transcriber``: ``accept_waveform`` -> events, ``partial``, ``final``.

    Everything mutable lives here (audio, encoder outputs, a decoder state of its own: runtime/decoding.py), so any
    number of streams and ``transcribe`` calls can share one Transcriber from different threads. One stream is
    fed by one thread at a time: a second thread feeding it at the same time gets a MegaedgeError."""

    def __init__(self, transcriber, options: StreamOptions = StreamOptions()):
        self._feeding, self._feeding_in = threading.Lock(), ""
        self.tr = transcriber
        self.opts = options
        info = transcriber.manifest
        self.window_frames = int(info.encoder.get("chunk_frames", 100)) * int(info.encoder.get("chunks_per_window", 8))
        hidden = int(info.graph("decoder").input("audio_features").shape[1])
        self._no_audio = np.zeros((0, hidden), transcriber.kv_dtype)
        self._state = decoding.open_state(transcriber, stream=True)
        p = info.prompt
        language = options.language
        self._suffix = [*p.after_audio, *(transcriber.token_ids(p.language_template.format(language=language))
                                          if language else [])]
        self.route = transcriber.check_route(transcriber.route if options.route is None else options.route)
        if getattr(self._state, "max_length", None) is not None:  # a fixed-KV decoder: a buffer of fixed length
            self._check_kv_room(self._state.max_length)
        self.reset()

    def _kv_positions(self, seconds: float) -> int:
        """Positions a span of ``seconds`` of audio may hold at most: the prompt with this stream's context, the
        audio rows, the suffix, the committed text and the final's new tokens (each at most its budget)."""
        p = self.tr.manifest.prompt
        context = len(self.tr.token_ids(self.opts.context)) if self.opts.context else 0
        audio = features.audio_token_count(math.ceil(seconds * RATE / features.HOP))
        return (len(p.system_head) + context + len(p.before_audio) + audio + len(self._suffix)
                + 2 * max_new_tokens_for(seconds))

    def _check_kv_room(self, limit: int) -> None:
        """Refuse, in one line, stream options whose longest span cannot fit a fixed KV buffer of ``limit``
        positions (``--target cuda`` bundles), rather than failing every hop of such a span."""
        span = self.opts.max_span_seconds or self.opts.segment_seconds  # StreamOptions holds one of them
        window = self.window_frames * features.HOP / RATE
        longest = math.ceil(span / window) * window + window  # spans roll at a window boundary, a hop late
        need = self._kv_positions(longest)
        if need <= limit:
            return
        fits = [s for s in range(int(window + self.opts.overlap_seconds) + 1, int(span))
                if self._kv_positions(math.ceil(s / window) * window + window) <= limit]
        fix = f"max_span_seconds {fits[-1]}" if fits and self.opts.max_span_seconds else None
        raise MegaedgeError(
            f"stream spans of up to {longest:g} s need up to {need} KV positions, but this bundle's fixed KV buffer "
            f"holds {limit} (decoder.max_kv_length): " + (f"use {fix}, or " if fix else "")
            + f"re-export with --max-kv-length {need} or more")

    # -------------------------------------------------------------------------------------------- public API
    @_one_caller
    def reset(self) -> None:
        """Forget everything: a new stream at time 0 (the weights stay loaded)."""
        self.stats = StreamStats()
        self.utterance = 0
        self.time = 0  # samples accepted so far (stream time)
        self._since_hop = 0
        self._resampler = None
        self._channel_axis: int | None = None  # a 2-D input's layout, once a block was long enough to tell
        self._width = audio_io.WidthWatch()  # wide integer blocks whose values fit 16 bits: refused
        # The transcriber's detector (runtime/vad.py) gates partials and finals on speech and drives endpointing;
        # without one, the energy VAD below only endpoints, as before detectors existed.
        self._gated = self.tr.vad is not None
        self._vad = (self.tr.vad.stream(keep_regions=1) if self._gated
                     else EnergyVad(self.opts.vad_margin_db, self.opts.vad_min_dbfs))
        self._span = self._new_span(0, self.opts.context)
        self._previous_text = ""  # tail of the finished spans' text in this utterance (long-form de-duplication)
        self._last: StreamEvent | None = None

    @_one_caller
    def accept_waveform(self, samples, sample_rate: int, partials: bool = True) -> list[StreamEvent]:
        """Feed any number of samples at ``sample_rate`` Hz (mono, [n, channels] or [channels, n]: a stream keeps
        the layout of its first block longer than 32 samples, and before one, reads the shorter axis as channels;
        float in [-1, 1], or integer PCM, scaled by its type's range as ``transcribe`` does); returns the events
        this produced. A stream keeps
        one input rate: a new rate starts a new resampler after flushing the old one. A block of any length is taken
        0.1 s at a time, as if it had been fed so: a long block gets every endpoint, cut and hop it holds (its hops
        cost as they would in real time; ``partials=False`` skips them).

        ``partials=False``: no partial hops for these samples, for a caller that has fallen behind real time and
        must catch up (a hop is most of a stream's compute). Endpoints, span rolls and segment cuts cut the audio
        where they would anyway and each final is still exact for its audio; hops missed are made up by the next
        call with partials on."""
        rate = audio_io.check_rate(sample_rate, "sample_rate")
        if not isinstance(partials, (bool, np.bool_)):
            raise MegaedgeError(f"partials {partials!r} is not True or False")
        chunk = self._to_16k(audio_io.as_float(samples, "stream input", watch=self._width), rate)
        # Endpoints, hops, span rolls and segment cuts are checked after each piece: a block of seconds fed at
        # once is cut where the same audio fed in small blocks is (it was one utterance, hop and check).
        events: list[StreamEvent] = []
        for start in range(0, chunk.size, PIECE):
            events += self._accept(chunk[start:start + PIECE], partials)
        return events

    def _accept(self, chunk: np.ndarray, partials: bool = True) -> list[StreamEvent]:
        if chunk.size == 0:
            return []
        span = self._span
        span.samples = np.concatenate([span.samples, chunk])
        self.time += chunk.size
        self._since_hop += chunk.size
        events = []
        if self.opts.endpointing or self._gated:
            self._vad.update(chunk)
        if self.opts.endpointing:
            if self._vad.heard_speech and self._vad.trailing_silence >= self.opts.endpoint_silence_seconds * RATE:
                events.append(self._finish("endpoint"))
                return events
            if not self._vad.heard_speech and span.samples.size > 2 * RATE and not span.committed:
                self._drop_leading_silence()
        if self._since_hop >= self.opts.hop_seconds * RATE and (partials or self._roll_due()):
            self._since_hop = 0
            if self._gated and not self._vad.heard_speech:
                return events  # nothing said yet: no partial guessed from noise
            if not self._gated and not np.any(span.samples):
                # Without a detector only digital silence is gated, as offline: a muted microphone's zeros are
                # never decoded (a model guesses words in them, which a span roll then passed on as context).
                if self._roll_due() and span.samples.size > 2 * RATE:
                    self._drop_leading_silence()  # the roll that bounds a span would decode them
                return events
            hop = self._hop()  # without partials only to encode the windows the roll cuts at
            if partials:
                events.append(hop)
            if self._span_full():
                events.append(self._roll_span())
        limit = self.opts.segment_seconds
        if limit is not None and self._span.samples.size > limit * RATE:
            events.append(self._cut_segment())
        return events

    @property
    def speech_heard(self) -> bool:
        """Whether the voice-activity detector has heard speech in the current utterance (a server's
        ``speech_started``)."""
        return bool(self._vad.heard_speech)

    @property
    def partial(self) -> StreamEvent | None:
        """The latest event (partial or final) of this stream."""
        return self._last

    @_one_caller
    def finish(self) -> list[StreamEvent]:
        """End of input: every final it produces, in order (exact: token-identical to offline transcription). The
        resampler's last samples are fed first, so a file streamed at 48 kHz ends where the offline one does; they
        may complete a segment or a span before the flushed utterance's own final, which then comes last."""
        return self._end()

    @_one_caller
    def final(self) -> StreamEvent:
        """End of input: the last final ``finish`` gives. Should the resampler's last samples complete another
        final before it (a non-16 kHz stream at a segment or span limit), that one is logged and lost here:
        callers that stream at other rates and keep every final use ``finish``."""
        events = self._end()
        if len(events) > 1:
            log.warning("Stream.final() dropped %d earlier final(s) of the end of input (%r ...): use finish()",
                        len(events) - 1, events[0].text[:40])
        return events[-1]

    flush = final

    def _end(self) -> list[StreamEvent]:
        ended = [e for e in self._accept(self._flush_resampler()) if e.kind == "final"]
        if ended and self.time - round(ended[-1].end * RATE) == 0 and self._span.samples.size == 0:
            return ended  # the flushed samples ended the utterance themselves
        return ended + [self._finish("flush")]

    # -------------------------------------------------------------------------------------------- internals
    def _to_16k(self, samples: np.ndarray, rate: int) -> np.ndarray:
        if samples.ndim == 2 and max(samples.shape) > audio_io.MAX_CHANNELS:  # long enough to tell the layout
            self._channel_axis = audio_io.channel_axis(samples.shape)
        samples = audio_io.to_mono(samples, self._channel_axis, "stream input")
        audio_io.check_finite(samples, "stream input")
        if self._resampler is not None and self._resampler[0] != rate:
            tail = self._flush_resampler()
        else:
            tail = np.zeros(0, np.float32)
        if rate == RATE:
            return np.concatenate([tail, samples]) if tail.size else samples
        if self._resampler is None:
            import soxr

            # The quality offline resampling uses (audio.resample): the same filter on the same samples.
            self._resampler = (rate, soxr.ResampleStream(rate, RATE, 1, dtype="float32", quality="HQ"))
        out = self._resampler[1].resample_chunk(samples).astype(np.float32)
        return np.concatenate([tail, out]) if tail.size else out

    def _flush_resampler(self) -> np.ndarray:
        """The samples a resampler still holds (its filter's delay), and a fresh start for the next input."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        out = self._resampler[1].resample_chunk(np.zeros(0, np.float32), last=True).astype(np.float32)
        self._resampler = None
        return out

    def _new_span(self, start_sample: int, context: str | None) -> _Span:
        gate = None
        if self.tr.manifest.routed:
            gate = 0.0 if self.route == "base" else 1.0  # auto: provisional until the router has heard 1 s
        return _Span(start_sample, context, gate)

    def _drop_leading_silence(self) -> None:
        span = self._span
        keep = int(0.5 * RATE)
        dropped = span.samples.size - keep
        self._span = self._new_span(span.start_sample + dropped, span.context)
        self._span.samples = span.samples[dropped:]

    def _roll_due(self) -> bool:
        """Whether the span holds the audio of the finished windows ``_span_full`` waits for: with partials off,
        the hop that encodes them still runs, so that a span rolls at the same boundary and its state stays
        bounded."""
        limit = self.opts.max_span_seconds
        if limit is None:
            return False
        window = self.window_frames * features.HOP
        return self._span.samples.size >= math.ceil(limit * RATE / window) * window + _HALF_WINDOW

    def _span_full(self) -> bool:
        limit = self.opts.max_span_seconds
        return limit is not None and len(self._span.windows) * self.window_frames * features.HOP >= limit * RATE

    # front-end and encoder ----------------------------------------------------------------------------------
    def _extend_frames(self, final: bool) -> int:
        span = self._span
        samples = span.samples
        if final and samples.size < features.ASR_MIN_SAMPLES:
            samples = np.pad(samples, (0, features.ASR_MIN_SAMPLES - samples.size))
            span.raw = span.raw[:, :0]  # end reflection of the padded clip differs: recompute all frames
        total = samples.size // features.HOP  # the offline front-end drops the last centred frame
        ready = total if final else min(total, max(0, (samples.size - _HALF_WINDOW) // features.HOP + 1))
        have = span.raw.shape[1]
        if ready > have:
            new = features.raw_log_mel_frames(samples, have, ready)
            span.raw = np.concatenate([span.raw, new], axis=1)
            span.max = max(span.max, float(new.max()))
        return span.raw.shape[1]

    def _encode(self, mels: list[np.ndarray], gate: float | None) -> list[np.ndarray]:
        width = max(m.shape[1] for m in mels)
        width = math.ceil(width / features.CHUNK_FRAMES) * features.CHUNK_FRAMES
        batch = np.stack([np.pad(m, ((0, 0), (0, width - m.shape[1]))) for m in mels]).astype(self.tr.float_dtype)
        valid = np.asarray([features.audio_token_count(m.shape[1]) for m in mels], np.int64)
        out = self.tr.encode_windows(batch, valid, gate)
        self.stats.encoder_windows += len(mels)
        return out

    def _window_mel(self, index: int, end: int | None = None) -> np.ndarray:
        span = self._span
        start = index * self.window_frames
        stop = min(start + self.window_frames, span.raw.shape[1]) if end is None else end
        return features.floor_and_scale(span.raw[:, start:stop], span.max)

    def _update_windows(self, frames: int, final: bool) -> np.ndarray | None:
        """Encode newly finished windows (at the final also stale ones); returns the open window's features (None
        if empty).

        A window is stale when a louder frame later raised the clip-wide floor above some of its values. Partials
        keep the stale output (only values 80 dB below the loudest frame differ), so a hop never re-encodes a
        finished window nor rebuilds the cache; the final re-encodes them, which keeps it exact."""
        span = self._span
        finished = frames // self.window_frames
        floor = span.max - 8.0
        stale = []
        for i, (out, used) in enumerate(span.windows):
            if used == span.max or not final:
                continue
            if float(span.raw[:, i * self.window_frames:(i + 1) * self.window_frames].min()) < floor:
                stale.append(i)
            else:  # every value above the new floor: the output stands; record it so the check is not repeated
                span.windows[i] = (out, span.max)
        todo = stale + list(range(len(span.windows), finished))
        open_frames = frames - finished * self.window_frames
        mels = [self._window_mel(i) for i in todo]
        if open_frames:
            mels.append(self._window_mel(finished, frames))
        outs = self._encode(mels, span.gate) if mels else []
        for i, out in zip(todo, outs):
            if i < len(span.windows):
                span.windows[i] = (out, span.max)
            else:
                span.windows.append((out, span.max))
        if stale:
            self.stats.reencoded_windows += len(stale)
            if min(stale) < span.kv_windows:  # audio under cached KV changed: rebuild the cache from scratch
                span.kv, span.kv_windows = None, 0
        return outs[-1] if open_frames else None

    # decoder ---------------------------------------------------------------------------------------------------
    def _prefix_ids(self) -> list[int]:
        p = self.tr.manifest.prompt
        context = self._span.context
        return [*p.system_head, *(self.tr.token_ids(context) if context else []), *p.before_audio]

    def _extend_kv(self) -> None:
        """Prefill what the cache lacks: the prompt prefix (once per span) and newly finished windows."""
        span = self._span
        new = span.windows[span.kv_windows:]
        if not new and span.kv is not None:
            return
        ids = ([] if span.kv is not None else self._prefix_ids()) + [self.tr.manifest.prompt.audio_pad] * sum(
            len(w) for w, _ in new)
        audio = np.concatenate([w for w, _ in new]) if new else self._no_audio
        self._state.rollback(span.kv or 0)
        self._state.extend(ids, audio, span.gate, 0)
        span.kv, span.kv_windows = self._state.length, len(span.windows)

    def _run_tail(self, ids: list[int], audio: np.ndarray, logit_rows: int) -> np.ndarray:
        """Logits of the last ``logit_rows`` of ``ids`` run after the committed cache (which stays as it was)."""
        self._state.rollback(self._span.kv or 0)
        self.stats.tail_rows.append(len(ids))
        return self._state.extend(ids, audio, self._span.gate, logit_rows)

    def _tail(self, open_audio: np.ndarray | None) -> tuple[list[int], np.ndarray]:
        """Ids after the cached KV (prefix + finished windows): open audio pads + suffix + committed text."""
        span = self._span
        audio = open_audio if open_audio is not None else self._no_audio
        ids = [self.tr.manifest.prompt.audio_pad] * len(audio) + self._suffix + span.committed
        return ids, audio

    def _greedy(self, logits: np.ndarray, prefix: list[int], limit: int, new_limit: int | None = None):
        """The one greedy loop (runtime/decoding.py), continuing ``prefix`` from the last tail's last logits."""
        return decoding.greedy(self._state, logits, self._span.gate, self.tr.manifest.prompt.eos, limit=limit,
                               new_limit=new_limit, prefix=prefix)

    def _hop(self) -> StreamEvent:
        t0 = time.perf_counter()
        span = self._span
        frames = self._extend_frames(final=False)
        if frames == 0:
            return self._event("partial", [], t0)
        self._maybe_route(final=False)
        open_audio = self._update_windows(frames, final=False)
        self._extend_kv()
        ids, audio = self._tail(open_audio)
        logits = self._run_tail(ids, audio, 1)
        budget = max_new_tokens_for(span.samples.size / RATE)
        per_hop = self.opts.unstable_tokens + math.ceil(10 * self.opts.hop_seconds) + 2
        result = self._greedy(logits[-1], span.committed, budget, per_hop)
        new = result.tokens
        hypothesis = span.committed + new
        # Commit what is older than the last unstable_tokens AND what the previous hop also proposed (local
        # agreement): one hop's guess at a word cut by the hop edge is never committed.
        candidate = new[: max(0, len(new) - self.opts.unstable_tokens)]
        agreed = 0
        previous = span.previous[len(span.committed):]
        while agreed < min(len(candidate), len(previous)) and candidate[agreed] == previous[agreed]:
            agreed += 1
        span.committed = span.committed + candidate[:agreed]
        span.committed_logprobs = span.committed_logprobs + result.logprobs[:agreed]
        span.previous = hypothesis
        self.stats.hops += 1
        event = self._event("partial", hypothesis, t0, logprobs=span.committed_logprobs)
        self.stats.hop_seconds.append(event.compute_seconds)
        return event

    def _final_tokens(self) -> tuple[list[int], list[float]]:
        """Exact greedy tokens for the span's audio, and their log-probabilities: committed tokens checked against
        the full audio in one call (its logits are the ones offline decoding computes for them)."""
        span = self._span
        frames = self._extend_frames(final=True)
        open_audio = self._update_windows(frames, final=True)
        self._extend_kv()
        ids, audio = self._tail(open_audio)
        n = len(span.committed)
        first = len(ids) - n - 1  # position whose logits predict committed[0]
        logits = self._run_tail(ids, audio, n + 1)
        predicted = logits.argmax(axis=-1)
        eos = set(self.tr.manifest.prompt.eos)
        agree = 0
        while agree < n and predicted[agree] == span.committed[agree]:
            agree += 1
        budget = max_new_tokens_for(span.samples.size / RATE)
        logprobs = [decoding.log_softmax_at(logits[i], span.committed[i]) for i in range(min(agree, budget))]
        if agree == n:
            if n >= budget:
                return span.committed[:budget], logprobs
            rest = self._greedy(logits[-1], span.committed, budget)
            return span.committed + rest.tokens, logprobs + rest.logprobs
        self.stats.revisions += 1
        kept = span.committed[:agree]
        if int(predicted[agree]) in eos or agree >= budget:
            return kept[:budget], logprobs  # a span rolled short can hold more committed tokens than its budget
        # Re-run the tail up to the first disagreement (cheaper than slicing every layer's cache).
        rest = self._greedy(self._run_tail(ids[: first + 1 + agree], audio, 1)[-1], kept, budget)
        return kept + rest.tokens, logprobs + rest.logprobs

    def _maybe_route(self, final: bool) -> None:
        span = self._span
        if self.route != "auto" or not self.tr.manifest.routed or (span.route_checked and not final):
            return
        if not final and span.samples.size < RATE:
            return
        decision = self.tr.route_probability(span.samples)
        gate = 1.0 if decision.route == "lora" else 0.0
        span.route_checked, span.degraded_prob = True, decision.degraded_prob
        if gate != span.gate:
            if final:
                self.stats.reroutes += 1
            span.gate = gate
            span.windows, span.kv, span.kv_windows = [], None, 0

    def _finish(self, reason: str) -> StreamEvent:
        t0 = time.perf_counter()
        span = self._span
        # the VAD heard no speech in it
        silent = (self.opts.endpointing or self._gated) and not self._vad.heard_speech
        if span.after_cut and span.samples.size:
            # The rest of a segmented utterance: offline transcription gates its last segment on the segment's own
            # audio, while the stream's VAD forgot at the cut what it had heard after it.
            silent = not self.tr.heard_speech(span.samples)
        tokens, logprobs, segment = [], [], None
        if span.samples.size and np.any(span.samples) and not silent:
            self._maybe_route(final=True)
            tokens, logprobs = self._final_tokens()
            if self.opts.loop_guard and decoding.repetition(tokens):
                # Same handling as offline (re-decode on the base route or with no-repeat-4-gram).
                segment = self._offline_segment()
                tokens, logprobs = segment.token_ids, segment.logprobs
        event = self._event("final", tokens, t0, reason, logprobs, segment=segment)
        self._previous_text = ""
        self.utterance += 1
        self._vad.reset_utterance()
        self._since_hop = 0
        self._span = self._new_span(self.time, self.opts.context)
        return event

    def _offline_segment(self):
        tr, span = self.tr, self._span
        route = self.route if tr.manifest.routed else "auto"
        return tr._transcribe_segment(span.samples, 0, span.samples.size, self.opts.language, span.context, route,
                                      None, False, True, _NullTimer())

    def _cut_segment(self) -> StreamEvent:
        """Exact long-form: end the span where offline transcription ends its segment; its final is the offline
        segment's (the same function decodes it), and the rest of the audio starts the next span afresh."""
        t0 = time.perf_counter()
        span = self._span
        cut = segmenting.segments(span.samples, self.opts.segment_seconds)[0][1]
        rest = span.samples[cut:]
        span.samples = span.samples[:cut]
        tokens, logprobs, segment = [], [], None
        if np.any(span.samples):
            segment = self._offline_segment()
            tokens, logprobs = segment.token_ids, segment.logprobs
        event = self._event("final", tokens, t0, "segment", logprobs, end_sample=span.start_sample + cut,
                            segment=segment)
        self.utterance += 1
        self._vad.reset_utterance()
        self._span = self._new_span(span.start_sample + cut, self.opts.context)
        self._span.samples = rest
        self._span.after_cut = True
        return event

    def _roll_span(self) -> StreamEvent:
        """Long-form: finalise the span at its last window boundary; continue with an overlap and text context."""
        t0 = time.perf_counter()
        span = self._span
        boundary = len(span.windows) * self.window_frames * features.HOP
        rest = span.samples[boundary:]
        keep = span.samples[boundary - int(self.opts.overlap_seconds * RATE):boundary]
        # The span's final covers exactly the finished windows: cut the samples there (all frames are final).
        span.samples = span.samples[:boundary]
        span.raw = span.raw[:, : len(span.windows) * self.window_frames]
        tokens, logprobs = self._final_tokens()
        # the event is this span's (its start, route probability, and end at the boundary), built before the swap
        event = self._event("final", tokens, t0, "span", logprobs, end_sample=span.start_sample + boundary)
        new_text = _drop_repeated_words(self._previous_text, event.text)
        # Only a tail is kept: de-duplication looks at a dozen words and the context at context_chars.
        self._previous_text = f"{self._previous_text} {new_text}".strip()[-400:]
        context = self._previous_text[-self.opts.context_chars:] if self.opts.context_chars else None
        context = " ".join(filter(None, [self.opts.context, context])) or None
        nxt = self._new_span(span.start_sample + boundary - keep.size, context)
        nxt.samples = np.concatenate([keep, rest])
        nxt.gate, nxt.route_checked, nxt.degraded_prob = span.gate, span.route_checked, span.degraded_prob
        self._span = nxt
        event = replace(event, text=new_text, committed=new_text)
        self._last = event
        return event

    # events ------------------------------------------------------------------------------------------------------
    def _text(self, tokens: list[int], collapse: bool = True) -> str:
        return self.tr.text_of(tokens, self.opts.language is not None, collapse).text

    def _event(self, kind: str, tokens: list[int], t0: float, reason: str = "", logprobs=(),
               end_sample: int | None = None, segment=None) -> StreamEvent:
        """The event of the current span; it ends at ``end_sample`` (default: all the audio received so far). A
        final decoded by offline transcription (``segment``) names the route that segment took."""
        span = self._span
        partial = kind == "partial"
        text = self._text(tokens, collapse=not partial)
        committed = self._text(span.committed, collapse=False) if partial else text
        if (kind == "partial" or reason != "span") and self._previous_text:
            text = _drop_repeated_words(self._previous_text, text)
            committed = _drop_repeated_words(self._previous_text, committed)
        if span.gate is None:
            route = "merged" if self.tr.manifest.source.get("adapter") else "base"
        else:
            route = "lora" if span.gate else "base"
        degraded_prob = span.degraded_prob
        if segment is not None and self.tr.manifest.routed:
            route, degraded_prob = segment.route, segment.degraded_prob
        confidence = (None, None)
        if not partial and len(logprobs):
            confidence = (float(np.mean(logprobs)), float(np.min(logprobs)))
        language = None
        if kind == "final":
            language = self.opts.language or self.tr.text_of(tokens, False).language
        end = self.time if end_sample is None else end_sample
        event = StreamEvent(kind, text, committed, span.start_sample / RATE, end / RATE, self.utterance, route,
                            tuple(tokens), time.perf_counter() - t0, reason, *confidence, degraded_prob, language,
                            tuple(float(x) for x in logprobs))
        self._last = event
        return event


class _NullTimer:
    def add(self, name: str, seconds: float) -> None:
        pass


def _drop_repeated_words(previous: str, text: str, max_words: int = 12) -> str:
    """``text`` without its leading words that repeat the end of ``previous`` (the audio overlap heard twice)."""
    if not previous or not text:
        return text
    norm = lambda w: "".join(ch for ch in w.lower() if ch.isalnum())  # noqa: E731
    before, words = [norm(w) for w in previous.split()], text.split()
    after = [norm(w) for w in words]
    for n in range(min(max_words, len(before), len(after)), 0, -1):
        if before[-n:] == after[:n]:
            return " ".join(words[n:])
    return text
