"""The realtime transcription protocol (OpenAI's realtime API, transcription intent) over one megaedge ``Stream``.

Nothing here does I/O: ``parse_client_event`` turns a WebSocket text frame into a command (or a ``ProtocolError``),
and ``RealtimeSession`` runs commands on its stream and returns the server events to send, as dicts. app.py moves
frames and runs ``RealtimeSession`` methods in a worker thread, one at a time per connection.

Client events: ``transcription_session.update`` (also ``session.update``), ``input_audio_buffer.append``,
``input_audio_buffer.commit``, ``input_audio_buffer.clear``.
Server events: ``transcription_session.created`` / ``updated``, ``input_audio_buffer.speech_started`` /
``speech_stopped`` / ``committed`` / ``cleared``, ``conversation.item.input_audio_transcription.delta`` /
``completed``, ``error``.

Choices where megaedge's stream differs from OpenAI's service (docs/serving.md):

* Server VAD is megaedge's endpointing: ``speech_started`` when the stream's voice-activity detector first hears
  speech in an utterance (checked every 0.1 s of audio), ``speech_stopped`` + ``committed`` + ``completed`` when the
  stream finalises the utterance after ``silence_duration_ms`` of trailing silence (default: the stream preset's,
  800 ms for ``balanced``).
* Deltas are append-only: ``delta`` is the text the stream has *committed* since the last delta (two hops agreed
  on it; it may be empty). The whole current hypothesis, unstable tail included, rides along in the extension
  field ``partial`` (and the committed part in ``stable``), for live captions. ``completed.transcript`` is the
  authority: the final checks every committed token against the whole utterance, so it can differ from the
  concatenated deltas (rarely; the stream's ``revisions`` count).
* ``completed`` carries megaedge fields beside OpenAI's: ``route``, ``degraded_prob`` (routed bundles on the auto
  route; else null), ``language``, ``mean_logprob``, ``min_logprob``, ``start`` / ``end`` (seconds of session
  audio), ``reason``; with ``session.include`` [``item.input_audio_transcription.logprobs``] also ``logprobs``,
  the transcript's tokens; deltas then carry the logprobs of the tokens they add, as the hop that committed them
  scored them (the final check may still revise committed text, and ``completed`` has the final's).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import secrets
from dataclasses import dataclass, replace

import numpy as np

from megaedge.errors import BundleError, ContextLengthError, MegaedgeError
from megaedge.runtime import output

log = logging.getLogger("megaedge.serve")

RATES = (16000, 24000)
DEFAULT_RATE = 24000  # OpenAI's pcm16: 24 kHz, 16-bit little-endian, mono
# OpenAI's input formats: pcm16, and G.711 (8 kHz, a byte a sample) as telephone gateways send it (Twilio, SIP)
FORMATS = ("pcm16", "g711_ulaw", "g711_alaw")
GA_FORMATS = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}  # the GA API's names
G711_RATE = 8000
SAMPLE_BYTES = {"pcm16": 2, "g711_ulaw": 1, "g711_alaw": 1}
PIECE_SECONDS = 0.1  # appended audio is fed in pieces of at most this: the granularity of speech / endpoint events
MIN_COMMIT_SECONDS = 0.1  # OpenAI refuses to commit less than 100 ms of audio
SILENCE_MS = (200, 5000)
LOGPROBS_INCLUDE = "item.input_audio_transcription.logprobs"  # session.include: completed carries token logprobs
CLIENT_EVENTS = ("transcription_session.update", "session.update", "input_audio_buffer.append",
                 "input_audio_buffer.commit", "input_audio_buffer.clear")


class ProtocolError(Exception):
    """A client event the server cannot act on: becomes an ``error`` event; the connection keeps serving."""

    def __init__(self, code: str, message: str, param: str | None = None, event_id: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.message, self.param, self.event_id, self.kind = code, message, param, event_id, kind


_counter = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}{next(_counter):06d}"


def error_event(code: str, message: str, param: str | None = None, event_id: str | None = None,
                kind: str = "invalid_request_error") -> dict:
    return {"type": "error", "event_id": new_id("event"),
            "error": {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id}}


def error_from(exc: ProtocolError) -> dict:
    return error_event(exc.code, exc.message, exc.param, exc.event_id, exc.kind)


# ------------------------------------------------------------------------------------------------ client events
@dataclass(frozen=True)
class Command:
    kind: str  # "update" | "append" | "commit" | "clear"
    event_id: str | None = None
    session: dict | None = None  # update
    pcm: np.ndarray | None = None  # append: int16 samples at the session's rate (decoded from ``audio`` when None)
    audio: bytes | None = None  # append: the payload as sent, in the session's input format
    partials: bool = True  # append: decode partials (off while the server is behind this connection)


def parse_client_event(text: str | bytes) -> Command:
    """One WebSocket text frame -> a Command, or ProtocolError (malformed JSON, unknown type, bad audio)."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("invalid_json", f"the event is not valid JSON ({exc})") from None
    except RecursionError:  # arrays nested past the parser's recursion: no event is
        raise ProtocolError("invalid_json", "the event is not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        raise ProtocolError("invalid_event", "an event is a JSON object with a string 'type'", "type")
    kind, event_id = doc["type"], doc.get("event_id")
    event_id = event_id if isinstance(event_id, str) else None
    if kind in ("transcription_session.update", "session.update"):
        session = doc.get("session")
        if not isinstance(session, dict):
            raise ProtocolError("invalid_value", f"{kind} needs a 'session' object", "session", event_id)
        return Command("update", event_id, session=session)
    if kind == "input_audio_buffer.append":  # decoded in order, by the session's format at that point
        return Command("append", event_id, audio=decode_base64(doc.get("audio"), event_id))
    if kind == "input_audio_buffer.commit":
        return Command("commit", event_id)
    if kind == "input_audio_buffer.clear":
        return Command("clear", event_id)
    raise ProtocolError("unknown_event_type", f"unknown event type {kind[:80]!r}; this server takes "
                        f"{', '.join(CLIENT_EVENTS)}", "type", event_id)


def decode_base64(audio, event_id: str | None = None) -> bytes:
    if not isinstance(audio, str):
        raise ProtocolError("invalid_value", "input_audio_buffer.append needs 'audio': base64 of the session's "
                            "input format (pcm16 by default)", "audio", event_id)
    try:
        return base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_base64", "'audio' is not valid base64", "audio", event_id) from None


def decode_audio(raw: bytes, fmt: str, event_id: str | None = None) -> np.ndarray:
    """An append's payload in input format ``fmt`` -> int16 samples (G.711 expanded by libsndfile's tables)."""
    if fmt == "pcm16":
        if len(raw) % 2:
            raise ProtocolError("invalid_audio_format", f"'audio' holds {len(raw)} bytes, an odd number: pcm16 is "
                                "2 bytes per sample (16-bit little-endian mono)", "audio", event_id)
        return np.frombuffer(raw, "<i2")
    if not raw:
        return np.zeros(0, np.int16)
    import io

    import soundfile as sf

    subtype = {"g711_ulaw": "ULAW", "g711_alaw": "ALAW"}[fmt]
    return sf.read(io.BytesIO(raw), dtype="int16", format="RAW", subtype=subtype, samplerate=G711_RATE,
                   channels=1)[0]


def decode_pcm16(audio, event_id: str | None = None) -> np.ndarray:
    """base64 of 16-bit little-endian mono PCM -> int16 samples."""
    return decode_audio(decode_base64(audio, event_id), "pcm16", event_id)


# ------------------------------------------------------------------------------------------------ session config
@dataclass(frozen=True)
class SessionConfig:
    rate: int = DEFAULT_RATE
    format: str = "pcm16"  # one of FORMATS
    language: str | None = None
    prompt: str | None = None
    model: str | None = None
    server_vad: bool = True
    silence_ms: int | None = None  # None: the stream preset's endpoint silence
    logprobs: bool = False  # session.include holds LOGPROBS_INCLUDE

    def to_session(self, session_id: str, silence_ms: int) -> dict:
        """The session object of created / updated events: OpenAI's shape plus ``input_audio_rate``."""
        turn = None
        if self.server_vad:
            turn = {"type": "server_vad", "silence_duration_ms": silence_ms, "threshold": None,
                    "prefix_padding_ms": None}
        return {"id": session_id, "object": "realtime.transcription_session", "modalities": ["text"],
                "input_audio_format": self.format, "input_audio_rate": self.rate,
                "input_audio_transcription": {"model": self.model, "language": self.language, "prompt": self.prompt},
                "turn_detection": turn, "include": [LOGPROBS_INCLUDE] if self.logprobs else None}


def apply_update(config: SessionConfig, session: dict, event_id: str | None = None) -> SessionConfig:
    """``config`` changed by a session update, in OpenAI's beta shape (``input_audio_format``,
    ``input_audio_transcription``, ``turn_detection``) or its GA shape (``audio.input.format`` {type, rate},
    ``audio.input.transcription``, ``audio.input.turn_detection``). Keys this server does not use are ignored."""

    def bad(param: str, message: str, code: str = "invalid_value"):
        return ProtocolError(code, message, f"session.{param}", event_id)

    changes: dict = {}
    audio_in = session.get("audio", {}).get("input", {}) if isinstance(session.get("audio"), dict) else {}
    if not isinstance(audio_in, dict):
        raise bad("audio.input", "'audio.input' must be an object")
    fmt = session.get("input_audio_format", audio_in.get("format"))
    rate = session.get("input_audio_rate")
    if isinstance(fmt, dict):  # GA: {"type": "audio/pcm", "rate": 24000}, {"type": "audio/pcmu"}
        rate = fmt.get("rate", rate)
        fmt = GA_FORMATS.get(fmt.get("type"), fmt.get("type"))
    if fmt is not None and fmt not in FORMATS:
        raise bad("input_audio_format", f"input audio format {str(fmt)[:40]!r} is not supported; send pcm16 "
                  "(16-bit little-endian mono) at 24000 or 16000 Hz, or g711_ulaw / g711_alaw at 8000 Hz",
                  "unsupported_audio_format")
    g711 = (config.format if fmt is None else fmt) != "pcm16"
    if g711 and rate is not None and rate != G711_RATE:
        raise bad("input_audio_rate", f"input audio rate {rate!r} is not G.711's: g711_ulaw and g711_alaw are "
                  f"{G711_RATE} Hz", "unsupported_audio_format")
    if fmt is not None or rate is not None:
        if g711:
            rate = G711_RATE
        rate = DEFAULT_RATE if rate is None else rate
        if isinstance(rate, bool) or (rate not in RATES and not g711):
            raise bad("input_audio_rate", f"input audio rate {rate!r} is not supported; use one of {RATES}",
                      "unsupported_audio_format")
        changes["rate"] = int(rate)
        changes["format"] = config.format if fmt is None else fmt
    transcription = session.get("input_audio_transcription", audio_in.get("transcription"))
    if transcription is not None:
        if not isinstance(transcription, dict):
            raise bad("input_audio_transcription", "'input_audio_transcription' must be an object")
        for key, field in (("language", "language"), ("prompt", "prompt"), ("model", "model")):
            if key in transcription:
                value = transcription[key]
                if value is not None and not isinstance(value, str):
                    raise bad(f"input_audio_transcription.{key}", f"'{key}' must be a string or null")
                changes[field] = value or None
    if "include" in session:
        include = session["include"]
        if include is not None and (not isinstance(include, list) or not all(isinstance(v, str) for v in include)):
            raise bad("include", "'include' must be a list of strings or null")
        unknown = [v for v in include or () if v != LOGPROBS_INCLUDE]
        if unknown:
            raise bad("include", f"include {unknown[0][:60]!r} is not supported; the one this server has is "
                      f"{LOGPROBS_INCLUDE!r}")
        changes["logprobs"] = bool(include)
    has_turn = "turn_detection" in session or "turn_detection" in audio_in
    if has_turn:
        turn = session["turn_detection"] if "turn_detection" in session else audio_in["turn_detection"]
        if turn is None:
            changes["server_vad"] = False
        elif not isinstance(turn, dict):
            raise bad("turn_detection", "'turn_detection' must be an object or null")
        else:
            kind = turn.get("type", "server_vad")
            if kind != "server_vad":
                raise bad("turn_detection.type", f"turn detection {str(kind)[:40]!r} is not supported; use "
                          "server_vad (megaedge's endpointing) or null (commit by hand)")
            changes["server_vad"] = True
            silence = turn.get("silence_duration_ms")
            if silence is not None:
                low, high = SILENCE_MS
                if isinstance(silence, bool) or not isinstance(silence, (int, float)) or not low <= silence <= high:
                    raise bad("turn_detection.silence_duration_ms",
                              f"silence_duration_ms {silence!r} is outside {low}-{high}")
                changes["silence_ms"] = int(silence)
    return replace(config, **changes)


# ------------------------------------------------------------------------------------------------ a session
def heard_speech(stream) -> bool:
    """Whether the stream's voice-activity detector has heard speech in the current utterance."""
    return stream.speech_heard


class RealtimeSession:
    """One connection's transcription state: a ``Stream`` on the shared transcriber, the session config and the
    conversation items. Every method returns the server events it produced; methods are called by one thread at a
    time. ``observe(kind, compute_seconds, tokens)`` is told of each stream event (metrics)."""

    def __init__(self, transcriber, base_options, model: str | None = None, observe=None):
        self.tr = transcriber
        self.base = base_options  # runtime.streaming.StreamOptions: hop, endpointing defaults, route
        self.id = new_id("sess")
        self.config = SessionConfig(model=model)
        self.observe = observe or (lambda kind, seconds, tokens: None)
        self.stream = self._new_stream(self.config)
        self.offset = 0  # 16 kHz samples of session time before the current stream (clear starts a new one)
        self.counted = 0.0  # session seconds some item's usage already counted (long-form spans overlap by 1 s)
        self.item: str | None = None
        self.previous_item: str | None = None
        self.speaking = False  # speech_started sent for the current item
        self.item_samples = 0.0  # 16 kHz samples appended since the last final
        self.sent = ""  # delta text sent for the current item
        self.sent_logprobs = 0  # logprobs entries sent with it
        self.partial = ""

    # -- config
    def _options(self, config: SessionConfig):
        changes = {"language": config.language, "context": config.prompt, "endpointing": config.server_vad}
        if config.silence_ms is not None:
            changes["endpoint_silence_seconds"] = config.silence_ms / 1000
        return replace(self.base, **changes)

    def _new_stream(self, config: SessionConfig):
        return self.tr.create_stream(self._options(config))  # MegaedgeError: language / prompt out of range

    @property
    def silence_ms(self) -> int:
        return self.config.silence_ms or round(self.base.endpoint_silence_seconds * 1000)

    def created(self) -> dict:
        return {"type": "transcription_session.created", "event_id": new_id("event"),
                "session": self.config.to_session(self.id, self.silence_ms)}

    def update(self, session: dict, event_id: str | None = None) -> list[dict]:
        """A new config. When language, prompt or turn detection change, the stream is rebuilt: audio of an open,
        uncommitted utterance is dropped (as ``clear`` does); send the update before the audio."""
        config = apply_update(self.config, session, event_id)
        if self._options(config) != self._options(self.config):
            try:
                stream = self._new_stream(config)
            except BundleError:
                raise  # the server's fault, not the update's: run() answers it
            except MegaedgeError as exc:
                param = "session.input_audio_transcription"
                raise ProtocolError("invalid_value", str(exc), param, event_id) from None
            self.offset += self.stream.time
            self.stream = stream
            self._close_item()
        self.config = config
        return [{"type": "transcription_session.updated", "event_id": new_id("event"),
                 "session": config.to_session(self.id, self.silence_ms)}]

    # -- audio
    def append(self, pcm: np.ndarray, partials: bool = True) -> list[dict]:
        """Feed int16 samples at the session's rate, in pieces of PIECE_SECONDS (so that speech and endpoints are
        seen where they happen even when a client sends seconds at once). ``partials=False``: finals only (no
        deltas), for a connection the server has fallen behind."""
        rate = self.config.rate
        step = max(1, int(rate * PIECE_SECONDS))
        out: list[dict] = []
        for i in range(0, len(pcm), step):
            piece = pcm[i : i + step]
            if self.item is None and not self.config.server_vad:
                self.item = new_id("item")  # commit by hand: an item starts with its first audio
            self.item_samples += piece.size * 16000 / rate
            events = self.stream.accept_waveform(piece, rate, partials)
            if self.config.server_vad and not self.speaking and heard_speech(self.stream):
                out.append(self._speech_started())
            for event in events:
                out.extend(self._stream_event(event))
        return out

    def _speech_started(self) -> dict:
        self.speaking = True
        self.item = self.item or new_id("item")
        return {"type": "input_audio_buffer.speech_started", "event_id": new_id("event"),
                "audio_start_ms": self._ms(self.stream.time), "item_id": self.item}

    def _ms(self, samples: float) -> int:
        return round((self.offset + samples) / 16)

    def _stream_event(self, event) -> list[dict]:
        self.observe(event.kind, event.compute_seconds, len(event.token_ids))
        if event.kind == "partial":
            if self.item is None or not (self.speaking or not self.config.server_vad):
                return []  # no utterance open (partials of trailing silence): nothing to say
            if event.text == self.partial and event.committed == self.sent:
                return []
            delta, entries = "", []
            if event.committed.startswith(self.sent):
                delta = event.committed[len(self.sent):]
                self.sent = event.committed
                if delta:  # counted with include off too: a session may turn it on mid-item
                    entries = self._delta_logprobs(event)
            self.partial = event.text
            out = {"type": "conversation.item.input_audio_transcription.delta", "event_id": new_id("event"),
                   "item_id": self.item, "content_index": 0, "delta": delta, "partial": event.text,
                   "stable": event.committed}
            if self.config.logprobs:
                out["logprobs"] = entries
            return [out]
        return self._final(event)

    def _delta_logprobs(self, event) -> list[dict]:
        """The entries of the tokens a delta added: the committed text's tokens past those already sent. Committed
        tokens only grow within an utterance, so the entries spelling the committed text grow by the delta's."""
        tokens = event.token_ids[:len(event.logprobs)]
        entries = output.text_token_logprobs(self.tr.tokenizer, tokens, event.logprobs,
                                             self.tr.manifest.prompt.asr_text, event.committed)
        new, self.sent_logprobs = entries[self.sent_logprobs:], len(entries)
        return new

    def _final(self, event) -> list[dict]:
        if event.reason in ("endpoint", "flush") and not event.text and self.item is None:
            self._close_item()
            return []  # a final of an utterance nobody opened (no speech, nothing committed by hand)
        item = self.item or new_id("item")
        out = []
        if self.speaking and event.reason in ("endpoint", "flush"):
            out.append({"type": "input_audio_buffer.speech_stopped", "event_id": new_id("event"),
                        "audio_end_ms": self._ms(event.end * 16000), "item_id": item})
        out.append({"type": "input_audio_buffer.committed", "event_id": new_id("event"), "item_id": item,
                    "previous_item_id": self.previous_item})
        start, end = self.offset / 16000 + event.start, self.offset / 16000 + event.end
        seconds = max(0.0, end - max(start, self.counted))  # audio an earlier item counted is not counted again
        self.counted = max(self.counted, end)
        out.append({"type": "conversation.item.input_audio_transcription.completed", "event_id": new_id("event"),
                    "item_id": item, "content_index": 0, "transcript": event.text,
                    "usage": {"type": "duration", "seconds": round(seconds, 3)},
                    "route": event.route, "degraded_prob": event.degraded_prob, "language": event.language,
                    "mean_logprob": event.mean_logprob,
                    "min_logprob": event.min_logprob, "start": start, "end": end, "reason": event.reason})
        if self.config.logprobs:
            out[-1]["logprobs"] = output.token_logprobs(self.tr, event)
        self.previous_item = item
        continuing = event.reason in ("span", "segment")  # long-form: the utterance goes on in a new item
        self._close_item()
        if continuing:
            self.item, self.speaking = new_id("item"), self.config.server_vad
        return out

    def _close_item(self) -> None:
        self.item, self.speaking, self.item_samples, self.sent, self.partial = None, False, 0.0, "", ""
        self.sent_logprobs = 0

    def commit(self, event_id: str | None = None) -> list[dict]:
        if self.item_samples < MIN_COMMIT_SECONDS * 16000:
            raise ProtocolError("input_audio_buffer_commit_empty",
                                f"buffer too small: expected at least {MIN_COMMIT_SECONDS * 1000:.0f} ms of audio, "
                                f"have {self.item_samples / 16:.0f} ms since the last commit", None, event_id)
        self.item = self.item or new_id("item")
        return [out for event in self.stream.finish() for out in self._stream_event(event)]

    def clear(self) -> list[dict]:
        self.offset += self.stream.time
        self.stream.reset()
        self._close_item()
        return [{"type": "input_audio_buffer.cleared", "event_id": new_id("event")}]

    def flush(self) -> list[dict]:
        """End of the session (server shutdown): the open utterance's final, if one is open."""
        if self.item is None or self.item_samples < MIN_COMMIT_SECONDS * 16000 and not self.speaking:
            return []
        return [out for event in self.stream.finish() for out in self._stream_event(event)]

    @property
    def open_utterance(self) -> bool:
        return self.item is not None

    def run(self, command: Command) -> list[dict]:
        """Run one command; a ProtocolError or MegaedgeError becomes an ``error`` event."""
        try:
            if command.kind == "update":
                return self.update(command.session or {}, command.event_id)
            if command.kind == "append":
                pcm = command.pcm
                if pcm is None:
                    pcm = decode_audio(command.audio or b"", self.config.format, command.event_id)
                return self.append(pcm, command.partials)
            if command.kind == "commit":
                return self.commit(command.event_id)
            if command.kind == "clear":
                return self.clear()
            raise ProtocolError("unknown_event_type", f"unknown command {command.kind!r}", None, command.event_id)
        except ProtocolError as exc:
            return [error_from(exc)]
        except BundleError as exc:  # the server's bundle, and its paths are the server's own: the log says
            log.error("realtime session %s: the bundle failed: %s", self.id, exc)
            return [error_event("server_error", "the server's bundle could not transcribe this session (its log "
                                "says why)", None, command.event_id, kind="server_error")]
        except ContextLengthError as exc:  # a fixed KV buffer (--target cuda) too small: name the prompt if one is set
            param = "session.input_audio_transcription.prompt" if self.config.prompt else None
            return [error_event("context_length_exceeded", str(exc), param, command.event_id)]
        except MegaedgeError as exc:
            return [error_event("invalid_value", str(exc), None, command.event_id)]
