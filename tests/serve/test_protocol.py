"""The realtime protocol without a server: client events, session updates in both of OpenAI's shapes, admission."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest

from megaedge.serve.protocol import (
    ProtocolError,
    SessionConfig,
    apply_update,
    decode_audio,
    decode_pcm16,
    parse_client_event,
)


def test_client_events_parse_to_commands():
    pcm = np.array([0, 1, -1, 32767, -32768], "<i2")
    command = parse_client_event(json.dumps({"type": "input_audio_buffer.append", "event_id": "e1",
                                             "audio": base64.b64encode(pcm.tobytes()).decode()}))
    assert (command.kind, command.event_id) == ("append", "e1")
    assert command.audio == pcm.tobytes()  # decoded in its turn, in the session's format
    assert decode_audio(command.audio, "pcm16").tolist() == pcm.tolist()
    assert parse_client_event('{"type": "input_audio_buffer.commit"}').kind == "commit"
    assert parse_client_event('{"type": "input_audio_buffer.clear"}').kind == "clear"
    assert parse_client_event('{"type": "session.update", "session": {}}').kind == "update"


@pytest.mark.parametrize("text, code", [
    ("{", "invalid_json"),
    ("[1, 2]", "invalid_event"),
    ('{"type": 3}', "invalid_event"),
    ('{"type": "response.create"}', "unknown_event_type"),
    ('{"type": "transcription_session.update"}', "invalid_value"),
    ('{"type": "input_audio_buffer.append"}', "invalid_value"),
    ('{"type": "input_audio_buffer.append", "audio": "not base64!"}', "invalid_base64"),
    ('{"type": "input_audio_buffer.append", "audio": "AAE="}', "invalid_audio_format"),  # 2 bytes: fine
    ("[" * 100000 + "]" * 100000, "invalid_json"),  # past the parser's recursion
])
def test_bad_client_events_are_protocol_errors(text, code):
    if code == "invalid_audio_format":
        assert decode_pcm16("AAE=").tolist() == [256]
        with pytest.raises(ProtocolError) as err:
            decode_pcm16(base64.b64encode(b"\x00\x01\x02").decode())
    else:
        with pytest.raises(ProtocolError) as err:
            parse_client_event(text)
    assert err.value.code == code


def test_session_updates_in_the_beta_and_the_ga_shape():
    base = SessionConfig()
    assert base.rate == 24000 and base.server_vad
    beta = apply_update(base, {"input_audio_format": "pcm16", "input_audio_rate": 16000,
                               "input_audio_transcription": {"language": "en", "prompt": "valves"},
                               "turn_detection": {"type": "server_vad", "silence_duration_ms": 600},
                               "input_audio_noise_reduction": None, "include": []})
    assert (beta.rate, beta.language, beta.prompt, beta.server_vad, beta.silence_ms) == (16000, "en", "valves",
                                                                                         True, 600)
    ga = apply_update(base, {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 16000}, "transcription": {"language": "de"},
        "turn_detection": None}}})
    assert (ga.rate, ga.language, ga.server_vad) == (16000, "de", False)
    assert apply_update(beta, {"input_audio_format": "pcm16"}).rate == 24000  # pcm16 alone: OpenAI's 24 kHz
    assert apply_update(beta, {}) == beta
    # G.711 (telephone gateways): 8 kHz, a byte a sample; back to pcm16 is OpenAI's 24 kHz again
    ulaw = apply_update(base, {"input_audio_format": "g711_ulaw"})
    assert (ulaw.format, ulaw.rate) == ("g711_ulaw", 8000)
    assert ulaw.to_session("s", 800)["input_audio_format"] == "g711_ulaw"
    alaw = apply_update(base, {"audio": {"input": {"format": {"type": "audio/pcma"}}}})
    assert (alaw.format, alaw.rate) == ("g711_alaw", 8000)
    assert apply_update(alaw, {"turn_detection": None}).format == "g711_alaw"
    assert (apply_update(alaw, {"input_audio_format": "pcm16"}).format,
            apply_update(alaw, {"input_audio_format": "pcm16"}).rate) == ("pcm16", 24000)
    # include: token log-probabilities on completed events, until an update leaves them out
    assert not beta.logprobs and beta.to_session("s", 800)["include"] is None
    asked = apply_update(base, {"include": ["item.input_audio_transcription.logprobs"]})
    assert asked.logprobs and asked.to_session("s", 800)["include"] == ["item.input_audio_transcription.logprobs"]
    assert apply_update(asked, {"turn_detection": None}).logprobs
    assert not apply_update(asked, {"include": None}).logprobs and not apply_update(asked, {"include": []}).logprobs


@pytest.mark.parametrize("fmt,subtype", [("g711_ulaw", "ULAW"), ("g711_alaw", "ALAW")])
def test_g711_payloads_decode_as_libsndfile_reads_the_format(fmt, subtype):
    import io

    import soundfile as sf

    pcm = (np.sin(np.arange(800) / 7) * 20000).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, 8000, format="RAW", subtype=subtype)
    raw = buf.getvalue()
    assert len(raw) == pcm.size  # a byte a sample
    decoded = decode_audio(raw, fmt)
    assert decoded.dtype == np.int16 and decoded.size == pcm.size
    assert np.max(np.abs(decoded.astype(int) - pcm)) < 700  # 8-bit companding: within a step of the original
    assert decode_audio(b"", fmt).size == 0
    assert decode_audio(b"\x01", fmt).size == 1  # any byte count is whole samples


@pytest.mark.parametrize("session, code, param", [
    ({"input_audio_format": "g722"}, "unsupported_audio_format", "session.input_audio_format"),
    ({"input_audio_format": "g711_ulaw", "input_audio_rate": 16000}, "unsupported_audio_format",
     "session.input_audio_rate"),
    ({"input_audio_rate": 44100}, "unsupported_audio_format", "session.input_audio_rate"),
    ({"turn_detection": {"type": "semantic_vad"}}, "invalid_value", "session.turn_detection.type"),
    ({"turn_detection": {"silence_duration_ms": 10}}, "invalid_value",
     "session.turn_detection.silence_duration_ms"),
    ({"input_audio_transcription": {"language": 7}}, "invalid_value",
     "session.input_audio_transcription.language"),
    ({"include": ["item.input_audio_transcription.words"]}, "invalid_value", "session.include"),
    ({"include": "item.input_audio_transcription.logprobs"}, "invalid_value", "session.include"),
])
def test_bad_session_updates_name_the_field(session, code, param):
    with pytest.raises(ProtocolError) as err:
        apply_update(SessionConfig(), session, "ev9")
    assert (err.value.code, err.value.param, err.value.event_id) == (code, param, "ev9")


def test_admission_queues_in_order_and_refuses_beyond_the_queue():
    from megaedge.serve.admission import Admission, Busy

    async def scenario():
        slots = Admission(2, 1)
        assert slots.try_acquire() and slots.try_acquire() and not slots.try_acquire()
        waiter = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0)
        assert slots.queued == 1
        with pytest.raises(Busy):
            await slots.acquire()
        slots.release()  # handed to the waiter, not freed
        await waiter
        assert (slots.active, slots.queued, slots.free) == (2, 0, 0)
        cancelled = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert slots.queued == 0
        slots.release()
        slots.release()
        assert (slots.active, slots.free) == (0, 2)

    asyncio.run(scenario())


def test_admission_lets_a_realtime_connection_wait_briefly_for_a_slot():
    import asyncio

    from megaedge.serve.admission import Admission

    async def scenario():
        admission = Admission(1, 1)
        assert admission.try_acquire()
        assert await admission.wait(0.05) is False  # nobody released it: refused when the time is up
        assert admission.queued == 0 and not admission._waiters
        waiting = asyncio.ensure_future(admission.wait(30))
        await asyncio.sleep(0)
        assert admission.queued == 0  # a realtime wait is not a queued transcription request
        admission.release()  # handed straight over
        assert await waiting is True
        assert (admission.active, admission.free) == (1, 0)
        admission.release()
        assert (admission.active, admission.free) == (0, 1)

    asyncio.run(scenario())


def test_a_freed_slot_goes_to_a_waiting_realtime_connection_before_queued_uploads():
    import asyncio

    from megaedge.serve.admission import Admission

    async def scenario():
        admission = Admission(1, 4)
        assert admission.try_acquire()
        uploads = [asyncio.ensure_future(admission.acquire()) for _ in range(3)]
        await asyncio.sleep(0)
        live = asyncio.ensure_future(admission.wait(30))
        await asyncio.sleep(0)
        admission.release()
        assert await live is True and not any(u.done() for u in uploads)
        admission.release()  # then the uploads, first come first served
        await asyncio.sleep(0)
        assert [u.done() for u in uploads] == [True, False, False]
        for u in uploads[1:]:
            u.cancel()
        await asyncio.gather(*uploads, return_exceptions=True)

    asyncio.run(scenario())


def test_a_full_fixed_kv_buffer_is_context_length_exceeded_and_the_session_goes_on():
    """A stream on a --target cuda bundle whose fixed KV buffer cannot hold a span (runtime/fixed_kv.py raises
    ContextLengthError) answers that event with context_length_exceeded, naming the prompt when the session set
    one, not a generic invalid_value; the next append is served."""
    from types import SimpleNamespace

    from megaedge.errors import ContextLengthError
    from megaedge.runtime.streaming import StreamOptions
    from megaedge.serve.protocol import Command, RealtimeSession

    class Stream:
        time, speech_heard, full = 0, False, True

        def accept_waveform(self, pcm, rate, partials):
            if self.full:
                raise ContextLengthError("decoder: 2000 cached + 100 new positions exceed this bundle's fixed KV "
                                         "buffer of 2048 (decoder.max_kv_length)")
            return []

    streams = []
    tr = SimpleNamespace(create_stream=lambda options: streams.append(Stream()) or streams[-1])
    session = RealtimeSession(tr, StreamOptions())
    pcm = np.zeros(2400, np.int16)
    for prompt, param in ((None, None), ("a long context", "session.input_audio_transcription.prompt")):
        if prompt:
            session.run(Command("update", session={"input_audio_transcription": {"prompt": prompt}}))
        (event,) = session.run(Command("append", "ev1", pcm=pcm))
        assert event["type"] == "error", event
        assert (event["error"]["code"], event["error"]["param"], event["error"]["event_id"]) == (
            "context_length_exceeded", param, "ev1")
    streams[-1].full = False
    assert session.run(Command("append", "ev2", pcm=pcm)) == []


def test_a_bundle_fault_is_a_server_error_that_names_no_server_path(caplog):
    """A BundleError (a forged tokenizer's id past the vocabulary) is the server's fault: the client gets a
    server_error without the bundle's path (it was an invalid_value carrying it); the log has the detail."""
    from types import SimpleNamespace

    from megaedge.errors import BundleError
    from megaedge.runtime.streaming import StreamOptions
    from megaedge.serve.protocol import Command, RealtimeSession

    def create_stream(options):
        if options.context:
            raise BundleError("/srv/secret/bundle/tokenizer.json: token id 9 is past the decoder's vocabulary")
        return SimpleNamespace(time=0, speech_heard=False, accept_waveform=lambda pcm, rate, partials: [])

    session = RealtimeSession(SimpleNamespace(create_stream=create_stream), StreamOptions())
    (event,) = session.run(Command("update", "u1", session={"input_audio_transcription": {"prompt": "valves"}}))
    assert (event["type"], event["error"]["type"], event["error"]["code"], event["error"]["event_id"]) == (
        "error", "server_error", "server_error", "u1")
    assert "/srv/secret" not in json.dumps(event) and "/srv/secret" in caplog.text
    assert session.config.prompt is None  # the session goes on as it was


def test_long_form_items_count_each_second_of_audio_once():
    """Span finals overlap by a second (the next span re-reads it as context): each completed item's usage counts
    only audio no earlier item counted, so the items' durations add up to the session's audio."""
    from types import SimpleNamespace

    from megaedge.runtime.streaming import StreamEvent, StreamOptions
    from megaedge.serve.protocol import Command, RealtimeSession

    finals = [StreamEvent("final", "one", "one", 0.0, 24.0, 0, "base", (1,), 0.1, "span"),
              StreamEvent("final", "two", "two", 23.0, 40.0, 0, "base", (2,), 0.1, "span"),
              StreamEvent("final", "three", "three", 39.0, 45.0, 0, "base", (3,), 0.1, "flush")]

    class Stream:
        time, speech_heard = 0, True

        def accept_waveform(self, pcm, rate, partials):
            return [finals.pop(0)] if finals else []

    tr = SimpleNamespace(create_stream=lambda options: Stream())
    session = RealtimeSession(tr, StreamOptions())
    usage = []
    for _ in range(3):
        for event in session.run(Command("append", None, pcm=np.zeros(1600, np.int16))):
            if event["type"].endswith(".completed"):
                usage.append(event["usage"]["seconds"])
    assert usage == [24.0, 16.0, 5.0]


def test_serve_config_checks_every_value_from_python():
    from megaedge.errors import MegaedgeError
    from megaedge.serve.config import ServeConfig

    config = ServeConfig(bundle="b", port="8080", max_streams=2.0, idle_timeout="30")
    assert (config.port, config.max_streams, config.idle_timeout) == (8080, 2, 30.0)
    for bad, match in (({"port": 70000}, "port 70000 is outside 0-65535"), ({"max_streams": 0}, "max-streams 0"),
                       ({"max_streams": True}, "max-streams True: expected a whole number"),
                       ({"idle_timeout": float("nan")}, "idle-timeout nan: must be a finite number"),
                       ({"max_queue": -1}, "max-queue -1 is outside"), ({"providers": "cpu"}, "providers 'cpu'"),
                       ({"max_backlog_seconds": 1.0}, "max_backlog_seconds 1 is under partials_behind_seconds 2"),
                       ({"bundle": None}, "bundle None is not a path"),
                       ({"api_key": 12345}, "api_key 12345 is not a string"),
                       ({"threads": -5}, "threads -5"), ({"decode": "bogus"}, "decode engine 'bogus'"),
                       ({"preset": "exact"}, "preset 'exact'"), ({"route": "x"}, "route 'x'"),
                       ({"verify": "no"}, "verify 'no' must be True or False"),
                       ({"expected_digest": "zz"}, "expected_digest 'zz' is not 64 hex digits"),
                       ({"host": 5}, "host 5 is not a non-empty string")):
        with pytest.raises(MegaedgeError, match=match) as err:
            ServeConfig(**{"bundle": "b", **bad})
        assert "\n" not in str(err.value)
