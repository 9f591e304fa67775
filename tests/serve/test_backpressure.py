"""Realtime slots and backpressure: a slot is free as soon as its client has gone (a client that reconnects at once
is never refused), a connection the server is behind gets finals without partials, and an append beyond the
backlog bound gets an error at once."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.serve.conftest import Running, barrier, health, metric, receive_until, send_audio

ws_sync = pytest.importorskip("websockets.sync.client", reason="needs websockets (dev extra)")
SILENCE = np.zeros(16000, "<i2")
SESSION_16K = json.dumps({"type": "transcription_session.update",
                          "session": {"input_audio_format": "pcm16", "input_audio_rate": 16000}})
COMPLETED = "conversation.item.input_audio_transcription.completed"


def connect(running):
    return ws_sync.connect(running.ws_url, open_timeout=60, max_size=None)


def paced(ws, pcm: np.ndarray, chunk: int = 1600) -> list[dict]:
    """Each append answered before the next is sent (a client the server keeps up with); every event."""
    from tests.serve.conftest import append_event

    events = []
    for i in range(0, len(pcm), chunk):
        ws.send(append_event(pcm[i : i + chunk]))
        events += barrier(ws)
    return events


@pytest.fixture(scope="module")
def one_slot(fixture_bundles, serve_transcriber):
    from megaedge.serve.app import ServeConfig

    running = Running(ServeConfig(bundle=str(fixture_bundles["merged"]), max_streams=1, max_queue=0,
                                  max_backlog_seconds=5.0), serve_transcriber)
    yield running
    running.stop()


# Half the connections end without a close frame (the socket dropped), which a context manager would not do
@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
def test_rapid_close_and_reconnect_is_never_refused(one_slot, clips):
    """--max-streams 1: 30 connections in a row, each closed (with a close frame, or the socket dropped) in the
    middle of an utterance with audio still being decoded, the next opened at once: every one gets a session."""
    first = []
    for cycle in range(30):
        ws = connect(one_slot)  # closed by hand below, abruptly every other time
        first.append(json.loads(ws.recv(timeout=60))["type"])
        ws.send(SESSION_16K)
        send_audio(ws, clips[cycle % len(clips)]["pcm"][:12800])  # 0.8 s of speech, no endpoint
        if cycle % 2:
            ws.socket.close()  # gone without a close frame
        else:
            ws.close()
    assert first == ["transcription_session.created"] * 30
    one_slot.wait_for(lambda: health(one_slot)["active_streams"] == 0, "the last slot is released")
    assert one_slot.state.decoding_peak == 1  # never more than max-streams decoding at once
    assert metric(one_slot, "megaedge_requests_total", 'kind="realtime",status="accepted"') >= 30


def test_a_second_simultaneous_client_is_refused(one_slot):
    from websockets.exceptions import ConnectionClosed

    before = _refusals(one_slot)
    with connect(one_slot) as a:
        assert json.loads(a.recv(timeout=60))["type"] == "transcription_session.created"
        with connect(one_slot) as b:
            event = json.loads(b.recv(timeout=60))
            assert (event["type"], event["error"]["code"]) == ("error", "rate_limit_exceeded")
            with pytest.raises(ConnectionClosed) as closed:
                b.recv(timeout=60)
            assert closed.value.rcvd.code == 1013
    assert _refusals(one_slot) == before + 1
    with connect(one_slot) as c:  # the slot is free again
        assert json.loads(c.recv(timeout=60))["type"] == "transcription_session.created"


def _refusals(running) -> float:
    try:
        return metric(running, "megaedge_requests_total", 'kind="realtime",status="rate_limit_exceeded"')
    except AssertionError:  # not counted yet
        return 0.0


def test_a_client_far_ahead_gets_finals_without_deltas(one_slot, serve_transcriber, clips):
    """Clip + silence in one append: more audio waits than partials_behind_seconds, so the stream is decoded
    without partials: no delta, and the final is still offline transcription's."""
    pcm = np.concatenate([clips[2]["pcm"], SILENCE])  # 3.3 s: behind (> 2 s), within the 5 s backlog bound
    before = metric(one_slot, "megaedge_realtime_catch_up_audio_seconds_total")
    with connect(one_slot) as ws:
        ws.recv(timeout=60)
        ws.send(SESSION_16K)
        send_audio(ws, pcm, chunk=len(pcm))
        events = receive_until(ws, COMPLETED)
    kinds = [e["type"] for e in events]
    assert kinds == ["transcription_session.updated", "input_audio_buffer.speech_started",
                     "input_audio_buffer.speech_stopped", "input_audio_buffer.committed", COMPLETED]
    done = events[-1]
    span = pcm[round(done["start"] * 16000): round(done["end"] * 16000)]
    assert done["transcript"] == serve_transcriber.transcribe(span, 16000).text
    after = metric(one_slot, "megaedge_realtime_catch_up_audio_seconds_total")
    assert after - before == pytest.approx(len(pcm) / 16000)


def test_a_client_the_server_keeps_up_with_gets_deltas(one_slot, serve_transcriber, clips):
    pcm = np.concatenate([clips[0]["pcm"], SILENCE])
    before = metric(one_slot, "megaedge_realtime_catch_up_audio_seconds_total")
    with connect(one_slot) as ws:
        ws.recv(timeout=60)
        ws.send(SESSION_16K)
        barrier(ws)
        events = paced(ws, pcm)
    deltas = [e for e in events if e["type"].endswith(".delta")]
    assert deltas and all(e["item_id"] == events[-1]["item_id"] for e in deltas)
    done = events[-1]
    assert done["type"] == COMPLETED
    span = pcm[round(done["start"] * 16000): round(done["end"] * 16000)]
    assert done["transcript"] == serve_transcriber.transcribe(span, 16000).text
    assert metric(one_slot, "megaedge_realtime_catch_up_audio_seconds_total") == before


def test_an_append_beyond_the_backlog_bound_gets_an_error_and_is_dropped(one_slot, serve_transcriber, clips):
    from tests.serve.conftest import append_event

    big = np.concatenate([clips[1]["pcm"], clips[2]["pcm"]])  # 5.8 s: over the 5 s bound on its own
    with connect(one_slot) as ws:
        ws.recv(timeout=60)
        ws.send(SESSION_16K)
        barrier(ws)
        ws.send(json.dumps({**json.loads(append_event(big)), "event_id": "evt_big"}))
        event = json.loads(ws.recv(timeout=60))
        assert event["type"] == "error"
        error = event["error"]
        assert (error["type"], error["code"], error["param"], error["event_id"]) == \
            ("rate_limit_error", "audio_backlog_exceeded", "audio", "evt_big")
        assert "5 s" in error["message"]
        # the connection goes on; the dropped audio is not part of the session
        pcm = np.concatenate([clips[3]["pcm"], SILENCE])
        events = paced(ws, pcm)
    done = events[-1]
    assert done["type"] == COMPLETED and done["start"] < 1.0
    span = pcm[round(done["start"] * 16000): round(done["end"] * 16000)]
    assert done["transcript"] == serve_transcriber.transcribe(span, 16000).text
