"""GET /v1/realtime: OpenAI's realtime transcription events over megaedge streams, against offline transcription."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.serve.conftest import (
    Running,
    append_event,
    barrier,
    health,
    metric,
    pcm16,
    receive_until,
    send_audio,
    text_part,
)

ws_sync = pytest.importorskip("websockets.sync.client", reason="needs websockets (dev extra)")
SILENCE = np.zeros(16000, "<i2")  # 1 s: longer than the 0.8 s endpoint silence
SESSION_16K = json.dumps({"type": "transcription_session.update",
                          "session": {"input_audio_format": "pcm16", "input_audio_rate": 16000}})


def connect(running, **kwargs):
    return ws_sync.connect(running.ws_url, open_timeout=60, max_size=None, **kwargs)


def stream_clip(running, pcm: np.ndarray) -> list[dict]:
    """Session at 16 kHz with server VAD; the clip and 1 s of silence at once (faster than real time); every event
    up to the first completed one."""
    with connect(running) as ws:
        assert json.loads(ws.recv(timeout=60))["type"] == "transcription_session.created"
        ws.send(SESSION_16K)
        send_audio(ws, np.concatenate([pcm, SILENCE]))
        return receive_until(ws, "conversation.item.input_audio_transcription.completed")


def check_utterance(events: list[dict], pcm: np.ndarray, transcriber) -> dict:
    """The events of one endpointed utterance are in order and its transcript is offline transcription's of the
    same samples (the span the final covers)."""
    kinds = [e["type"] for e in events if not e["type"].startswith("transcription_session")]
    assert kinds[0] == "input_audio_buffer.speech_started"
    assert kinds[-3:] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                          "conversation.item.input_audio_transcription.completed"]
    assert set(kinds[1:-3]) <= {"conversation.item.input_audio_transcription.delta"}
    done = events[-1]
    items = {e["item_id"] for e in events if "item_id" in e}
    assert items == {done["item_id"]}
    audio = np.concatenate([pcm, SILENCE])
    span = audio[round(done["start"] * 16000): round(done["end"] * 16000)]
    offline = transcriber.transcribe(span, 16000)
    assert done["transcript"] == offline.text
    assert done["route"] == offline.route == "merged" and done["reason"] == "endpoint"
    assert done["min_logprob"] == pytest.approx(offline.min_logprob, abs=1e-3)
    assert done["mean_logprob"] == pytest.approx(offline.mean_logprob, abs=1e-3)
    for delta in (e for e in events if e["type"].endswith(".delta")):
        assert isinstance(delta["delta"], str) and delta["partial"].startswith(delta["stable"][:1])
        assert "logprobs" not in delta  # only when the session includes them
    return done


def test_eight_concurrent_clients_get_offline_transcripts(server, serve_transcriber, clips):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda item: stream_clip(server, item["pcm"]), clips))
    for item, events in zip(clips, results):
        check_utterance(events, item["pcm"], serve_transcriber)
    server.wait_for(lambda: health(server)["active_streams"] == 0, "slots released")
    assert metric(server, "megaedge_active_streams", 'kind="realtime"') == 0


@pytest.mark.parametrize("rate", [16000, 24000])
def test_manual_commit_transcribes_the_whole_buffer_like_offline(server, serve_transcriber, clips, rate):
    from megaedge.runtime import audio as audio_io

    item = clips[3]
    pcm = pcm16(audio_io.load(item["path"], target=rate))
    with connect(server) as ws:
        ws.recv(timeout=60)
        update = {"turn_detection": None}
        if rate == 16000:
            update["audio"] = {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}
        ws.send(json.dumps({"type": "session.update", "session": update}))
        send_audio(ws, pcm, chunk=rate // 10)
        ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c1"}))
        events = receive_until(ws, "conversation.item.input_audio_transcription.completed")
    kinds = [e["type"] for e in events]
    assert "input_audio_buffer.speech_started" not in kinds  # no server VAD
    assert kinds[-2:] == ["input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed"]
    updated = events[0]
    assert updated["type"] == "transcription_session.updated"
    assert updated["session"]["turn_detection"] is None and updated["session"]["input_audio_rate"] == rate
    offline = serve_transcriber.transcribe(pcm, rate)
    assert events[-1]["transcript"] == offline.text and events[-1]["start"] == 0.0


@pytest.mark.parametrize("language", [None, "en"])
def test_include_logprobs_gives_the_transcripts_tokens(server, serve_transcriber, clips, language):
    """session.include asks for the transcript's token log-probabilities on completed events (OpenAI's
    item.input_audio_transcription.logprobs): those of offline transcription's text tokens of the same span."""
    item = clips[4]
    session = {"input_audio_format": "pcm16", "input_audio_rate": 16000,
               "include": ["item.input_audio_transcription.logprobs"]}
    if language:
        session["input_audio_transcription"] = {"language": language}
    with connect(server) as ws:
        ws.recv(timeout=60)
        ws.send(json.dumps({"type": "transcription_session.update", "session": session}))
        send_audio(ws, np.concatenate([item["pcm"], SILENCE]))
        events = receive_until(ws, "conversation.item.input_audio_transcription.completed")
    assert events[0]["session"]["include"] == ["item.input_audio_transcription.logprobs"]
    done = events[-1]
    audio = np.concatenate([item["pcm"], SILENCE])
    span = audio[round(done["start"] * 16000): round(done["end"] * 16000)]
    offline = serve_transcriber.transcribe(span, 16000, language=language and "English").segments[0]
    assert done["transcript"] == offline.text and offline.text
    assert language or serve_transcriber.manifest.prompt.asr_text in offline.token_ids  # it named the language
    _, logprobs = text_part(serve_transcriber, offline, language is not None)
    assert [e["logprob"] for e in done["logprobs"]] == pytest.approx(logprobs, abs=1e-3)
    assert bytes(b for e in done["logprobs"] for b in e["bytes"]).decode().strip() == done["transcript"]
    assert all(e["logprobs"] == [] for e in events if e["type"].endswith(".delta") and not e["delta"])


def test_included_logprobs_ride_on_each_delta(serve_transcriber, clips):
    """With session.include, each delta carries the entries of the tokens it adds, which spell it exactly, also when
    a session turns it on mid-item (its first delta once carried the entries of all the text sent before). (The
    protocol object fed 0.32 s appends: through a server, audio sent at once outruns the partials.)"""
    from megaedge.runtime.streaming import StreamOptions
    from megaedge.serve.protocol import Command, RealtimeSession

    session = RealtimeSession(serve_transcriber, StreamOptions.preset("balanced"))
    session.run(Command("update", session={"input_audio_format": "pcm16", "input_audio_rate": 16000}))
    pcm = np.concatenate([*(clips[i]["pcm"] for i in range(3)), SILENCE])
    events = []
    for i in range(0, len(pcm), 5120):
        events += session.run(Command("append", pcm=pcm[i : i + 5120]))
        if not session.config.logprobs and any(e.get("delta") for e in events):
            session.run(Command("update", session={"include": ["item.input_audio_transcription.logprobs"]}))
            toggled = len(events)
    deltas = [e for e in events if e["type"].endswith(".delta")]
    included = [e for e in events[toggled:] if e["type"].endswith(".delta")]
    assert sum(bool(e["delta"].strip()) for e in included) >= 2, "the committed text arrives in several deltas"
    assert all("logprobs" not in e for e in events[:toggled])
    for delta in included:
        spelled = bytes(b for e in delta["logprobs"] for b in e["bytes"]).decode()
        assert spelled.strip() == delta["delta"].strip() and all(e["logprob"] <= 0 for e in delta["logprobs"])
        assert bool(delta["logprobs"]) == bool(delta["delta"].strip())
    done = next(e for e in events if e["type"].endswith(".completed"))
    assert "".join(e["delta"] for e in deltas).split()[:2] == done["transcript"].split()[:2]


@pytest.mark.parametrize("fmt,subtype,shape", [("g711_ulaw", "ULAW", "beta"), ("g711_alaw", "ALAW", "ga")])
def test_g711_from_a_telephone_gateway_transcribes_like_offline(server, serve_transcriber, clips, fmt, subtype,
                                                                shape):
    """G.711 at 8 kHz, as Twilio's media streams and SIP gateways send it (OpenAI's g711_ulaw / g711_alaw, GA
    audio/pcmu / audio/pcma): the transcript is offline transcription's of the same samples at 8 kHz."""
    import base64
    import io

    import soundfile as sf

    from megaedge.runtime import audio as audio_io

    pcm = pcm16(audio_io.load(clips[2]["path"], target=8000))
    buf = io.BytesIO()
    sf.write(buf, pcm, 8000, format="RAW", subtype=subtype)
    payload = buf.getvalue()
    heard = sf.read(io.BytesIO(payload), dtype="int16", format="RAW", subtype=subtype, samplerate=8000,
                    channels=1)[0]
    session = ({"input_audio_format": fmt} if shape == "beta"
               else {"audio": {"input": {"format": {"type": {"g711_ulaw": "audio/pcmu",
                                                             "g711_alaw": "audio/pcma"}[fmt]}}}})
    with connect(server) as ws:
        ws.recv(timeout=60)
        ws.send(json.dumps({"type": "session.update", "session": {**session, "turn_detection": None}}))
        for i in range(0, len(payload), 160):  # 20 ms frames, as a gateway sends them
            ws.send(json.dumps({"type": "input_audio_buffer.append",
                                "audio": base64.b64encode(payload[i:i + 160]).decode()}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events = receive_until(ws, "conversation.item.input_audio_transcription.completed")
    updated = events[0]["session"]
    assert (updated["input_audio_format"], updated["input_audio_rate"]) == (fmt, 8000)
    assert not [e for e in events if e["type"] == "error"]
    offline = serve_transcriber.transcribe(heard, 8000)
    assert events[-1]["transcript"] == offline.text and offline.text


def test_capacity_32_clients_against_8_streams(server, serve_transcriber, clips):
    """32 realtime clients: exactly 8 get a session, 24 an error and close 1013; then, with those 8 slots held,
    32 transcription requests: 8 wait in the queue, 24 get 429; every admitted one is answered correctly."""
    from contextlib import ExitStack

    import openai
    from websockets.exceptions import ConnectionClosed

    with ExitStack() as stack:
        sockets = [stack.enter_context(connect(server)) for _ in range(32)]
        first = [json.loads(ws.recv(timeout=60)) for ws in sockets]
        accepted = [ws for ws, e in zip(sockets, first) if e["type"] == "transcription_session.created"]
        refused = [(ws, e) for ws, e in zip(sockets, first) if e["type"] == "error"]
        assert (len(accepted), len(refused)) == (8, 24)
        for ws, event in refused:
            assert event["error"]["code"] == "rate_limit_exceeded"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=60)
            assert closed.value.rcvd.code == 1013
        assert health(server)["active_streams"] == 8

        api = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
        path = clips[0]["path"]

        def request(_):
            try:
                with open(path, "rb") as f:
                    return api.audio.transcriptions.create(model="m", file=f).text
            except openai.RateLimitError as exc:
                return exc

        with ThreadPoolExecutor(32) as pool:
            pending = [pool.submit(request, i) for i in range(32)]
            server.wait_for(lambda: sum(f.done() for f in pending) == 24 and health(server)["queued_requests"] == 8,
                            "24 refused and 8 queued")
            refusals = [f.result() for f in pending if f.done()]
            assert all(isinstance(r, openai.RateLimitError) and r.status_code == 429 for r in refusals)
            # The 8 realtime sessions stream their clips while 8 requests wait; then they leave and free the slots.
            for ws, item in zip(accepted, clips):
                ws.send(SESSION_16K)
                send_audio(ws, np.concatenate([item["pcm"], SILENCE]))
            for ws, item in zip(accepted, clips):
                events = receive_until(ws, "conversation.item.input_audio_transcription.completed")
                check_utterance(events, item["pcm"], serve_transcriber)
                ws.close()
            texts = [f.result() for f in pending if not isinstance(f.result(), Exception)]
        assert texts == [serve_transcriber.transcribe(path).text] * 8
    server.wait_for(lambda: health(server)["active_streams"] == 0, "slots released")
    assert metric(server, "megaedge_requests_total", 'kind="realtime",status="rate_limit_exceeded"') >= 24


def test_malformed_events_get_errors_and_the_connection_keeps_serving(server, serve_transcriber, clips):
    import base64

    item = clips[4]
    with connect(server) as ws:
        ws.recv(timeout=60)
        bad = [
            ("{not json", "invalid_json"),
            (json.dumps({"type": "response.create"}), "unknown_event_type"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "***"}), "invalid_base64"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\1\2\3").decode()}),
             "invalid_audio_format"),
            (json.dumps({"type": "transcription_session.update", "session": {"input_audio_format": "g722"}}),
             "unsupported_audio_format"),
            (json.dumps({"type": "transcription_session.update",
                         "session": {"input_audio_transcription": {"language": "Klingon"}}}), "invalid_value"),
            (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
        ]
        for text, code in bad:
            ws.send(text)
            event = json.loads(ws.recv(timeout=60))
            assert (event["type"], event["error"]["code"]) == ("error", code), text
        ws.send(b"\0\1")
        assert json.loads(ws.recv(timeout=60))["error"]["code"] == "invalid_event"
        ws.send(SESSION_16K)
        send_audio(ws, np.concatenate([item["pcm"], SILENCE]))
        events = receive_until(ws, "conversation.item.input_audio_transcription.completed")
    assert events[0]["type"] == "transcription_session.updated"
    assert events[0]["session"]["input_audio_transcription"]["language"] is None  # the bad update changed nothing
    check_utterance(events, item["pcm"], serve_transcriber)


def test_clear_drops_the_buffer(server, serve_transcriber, clips):
    item = clips[5]
    with connect(server) as ws:
        ws.recv(timeout=60)
        ws.send(SESSION_16K)
        send_audio(ws, clips[6]["pcm"][:8000])  # half a second of another clip, then cleared
        ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        events = barrier(ws)
        assert events[-1]["type"] == "input_audio_buffer.cleared"
        send_audio(ws, np.concatenate([item["pcm"], SILENCE]))
        events = receive_until(ws, "conversation.item.input_audio_transcription.completed")
    done = events[-1]
    assert done["start"] >= 0.5  # session time counts on across the clear
    shifted = dict(done, start=done["start"] - 0.5, end=done["end"] - 0.5)
    check_utterance(events[:-1] + [shifted], item["pcm"], serve_transcriber)


def test_a_client_leaving_mid_utterance_frees_its_stream(server, clips):
    with connect(server) as ws:
        ws.recv(timeout=60)
        ws.send(SESSION_16K)
        send_audio(ws, clips[0]["pcm"][: len(clips[0]["pcm"]) // 2])
        barrier(ws)
        assert health(server)["active_streams"] == 1
        ws.socket.close()  # gone without a close frame
    server.wait_for(lambda: health(server)["active_streams"] == 0, "the stream slot is released")
    assert metric(server, "megaedge_active_streams", 'kind="realtime"') == 0


def test_realtime_api_key_idle_timeout(fixture_bundles, serve_transcriber):
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    from megaedge.serve.app import ServeConfig

    running = Running(ServeConfig(bundle=str(fixture_bundles["merged"]), api_key="sesame", idle_timeout=1.0),
                      serve_transcriber)
    try:
        with pytest.raises(InvalidStatus) as err:
            connect(running)
        assert err.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            connect(running, additional_headers={"Authorization": "Bearer nope"})
        with connect(running, additional_headers={"Authorization": "Bearer sesame"}) as ws:
            assert json.loads(ws.recv(timeout=60))["type"] == "transcription_session.created"
        url = running.ws_url + "&api_key=sesame"
        with ws_sync.connect(url, open_timeout=60) as ws:
            assert json.loads(ws.recv(timeout=60))["type"] == "transcription_session.created"
            # no events: the idle timeout closes the connection with an error first
            assert json.loads(ws.recv(timeout=60))["error"]["code"] == "idle_timeout"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=60)
            assert closed.value.rcvd.code == 1000
    finally:
        running.stop()


def test_shutdown_finishes_open_utterances(fixture_bundles, serve_transcriber, clips):
    from websockets.exceptions import ConnectionClosed

    from megaedge.serve.app import ServeConfig

    running = Running(ServeConfig(bundle=str(fixture_bundles["merged"])), serve_transcriber)
    item = clips[7]
    stopped = False
    try:
        with connect(running) as ws:
            ws.recv(timeout=60)
            ws.send(SESSION_16K)
            send_audio(ws, item["pcm"])  # no trailing silence: the utterance is still open
            before = barrier(ws)
            assert any(e["type"] == "input_audio_buffer.speech_started" for e in before)
            running.stop()  # as SIGTERM: finalise, send, close 1001
            stopped = True
            events = receive_until(ws, "conversation.item.input_audio_transcription.completed")
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=60)
        assert closed.value.rcvd.code == 1001
    finally:
        if not stopped:
            running.stop()
    assert [e["type"] for e in events][-3:] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                                               "conversation.item.input_audio_transcription.completed"]
    done = events[-1]
    assert done["reason"] == "flush"
    offline = serve_transcriber.transcribe(item["pcm"][round(done["start"] * 16000):], 16000)
    assert done["transcript"] == offline.text


def test_a_message_over_the_request_limit_is_refused_with_an_event(fixture_bundles, serve_transcriber):
    """A message over --max-request-mb is dropped with an error event naming the limit and the connection goes on;
    only one past the protocol's own limit (well above it) closes with 1009."""
    from websockets.exceptions import ConnectionClosed

    from megaedge.serve.app import ServeConfig

    running = Running(ServeConfig(bundle=str(fixture_bundles["merged"]), max_request_mb=0.05), serve_transcriber)
    try:
        assert running.state.config.ws_frame_bytes == 1 << 20
        with connect(running) as ws:
            assert json.loads(ws.recv(timeout=60))["type"] == "transcription_session.created"
            ws.send(append_event(np.zeros(40000, "<i2")))  # 80 kB of PCM: ~107 kB of JSON
            error = json.loads(ws.recv(timeout=60))["error"]
            assert error["code"] == "message_too_large" and "0.05 MiB" in error["message"]
            assert barrier(ws) == []  # still served
            ws.send(append_event(np.zeros(400000, "<i2")))  # ~1.07 MB: past the protocol's limit
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=60)
            assert closed.value.rcvd.code == 1009
        assert metric(running, "megaedge_errors_total", 'code="message_too_large"') == 1
    finally:
        running.stop()


def test_a_client_that_reads_nothing_loses_its_slot(fixture_bundles, serve_transcriber, monkeypatch):
    """A client that floods events and never reads the replies blocked the server's sends for ever: neither the
    idle timeout nor keepalive freed its slot. A send that waits SEND_TIMEOUT_SECONDS aborts the connection."""
    import base64
    import os
    import socket

    from megaedge.serve import realtime
    from megaedge.serve.app import ServeConfig

    monkeypatch.setattr(realtime, "SEND_TIMEOUT_SECONDS", 1.0)
    running = Running(ServeConfig(bundle=str(fixture_bundles["merged"]), idle_timeout=600), serve_transcriber)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", running.port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /v1/realtime?intent=transcription HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        running.wait_for(lambda: health(running)["active_streams"] == 1, "the connection holds a slot")
        mask = b"\x01\x02\x03\x04"
        frame = bytes([0x81, 0x80 | 4]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"{bad"))
        sock.setblocking(False)
        sent = 0
        for _ in range(40000):  # replies pile up unread: the server's sends stall
            try:
                sock.send(frame)
                sent += 1
            except BlockingIOError:
                break
        assert sent > 1000
        running.wait_for(lambda: health(running)["active_streams"] == 0, "the slot is freed")
        assert metric(running, "megaedge_errors_total", 'code="client_not_reading"') == 1
        sock.close()
    finally:
        running.stop()
