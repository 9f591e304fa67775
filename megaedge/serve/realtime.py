"""The realtime WebSocket (``GET /v1/realtime``): OpenAI's realtime transcription events over megaedge streams,
one connection per stream slot, its events decoded in order in the server's pool."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from megaedge.serve.bodylimit import error_body

if TYPE_CHECKING:
    from megaedge.serve.app import ServerState

log = logging.getLogger("megaedge.serve")
# Events queued per realtime connection: beyond, an event is answered with an error at once and dropped (tiny
# appends or a flood of bad frames would otherwise hold memory that the audio bound below does not see).
MAX_QUEUED_EVENTS = 1024
MAX_JOB_SECONDS = 5.0  # audio per worker job: a connection's backlog is fed in jobs of at most this
CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_AGAIN = 1001, 1008, 1013
# A client that has read nothing while this long's events waited to be sent is gone or hung: its connection is
# aborted and its slot freed (uvicorn's keepalive closes such a socket without telling the app, whose sends then
# wait for ever, and the idle timeout never runs while a send waits).
SEND_TIMEOUT_SECONDS = 10.0


async def serve_socket(state, ws) -> None:
    """One connection: the API key, the intent, readiness and a stream slot checked (each refusal an error event
    and a close code), then the session until the client leaves or the server drains."""
    from starlette.responses import JSONResponse

    config = state.config
    if not state.authorized(ws.headers, ws.query_params):
        state.metrics.errors.labels("invalid_api_key").inc()
        await ws.send_denial_response(JSONResponse(error_body(
            "missing or wrong API key: send Authorization: Bearer KEY (or ?api_key=KEY)", "invalid_api_key"),
            status_code=401))
        return
    offered = ws.scope.get("subprotocols") or []
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
    intent = ws.query_params.get("intent")
    refusal = None  # (close code, error code, error type, message)
    if intent not in (None, "transcription"):
        refusal = (CLOSE_POLICY, "invalid_intent", "invalid_request_error", f"intent {intent[:40]!r}: this server "
                   "only runs transcription sessions (?intent=transcription)")
    elif state.draining:
        refusal = (CLOSE_GOING_AWAY, "shutting_down", "server_error", "the server is shutting down")
    elif state.transcriber is None:
        refusal = (CLOSE_TRY_AGAIN, "not_ready", "server_error",
                   f"not ready: {state.load_error or 'the model is still loading'}")
    elif not await state.admission.wait(config.slot_wait_seconds):
        refusal = (CLOSE_TRY_AGAIN, "rate_limit_exceeded", "rate_limit_error",
                   f"server busy: all {config.max_streams} streams are in use; retry in a second")
    if refusal is not None:
        code, err, kind, message = refusal
        state.metrics.requests.labels("realtime", err).inc()
        from megaedge.serve.protocol import error_event

        await Connection.send_raw(state, ws, [error_event(err, message, kind=kind)])
        await close(ws, code, err)
        return
    active = state.metrics.active_streams.labels("realtime")
    active.inc()
    state.metrics.requests.labels("realtime", "accepted").inc()

    def release() -> None:
        active.dec()
        state.admission.release()

    await Connection(state, ws, release).run()


def _abort(ws) -> None:
    """Drop ``ws``'s TCP connection without a closing handshake, which a client that reads nothing never completes.
    The ASGI interface has no such call: the server protocol object (which has the transport) is found behind the
    send callable, through the wrappers Starlette puts around it."""
    seen, todo = set(), [getattr(ws, "_send", None)]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen or len(seen) > 32:
            continue
        seen.add(id(item))
        transport = getattr(item, "transport", None)
        if transport is not None and hasattr(transport, "abort"):
            transport.abort()  # connection_lost: the reader gets its disconnect
            return
        todo.append(getattr(item, "__self__", None))
        todo.extend(cell.cell_contents for cell in (getattr(item, "__closure__", None) or ())
                    if callable(getattr(cell, "cell_contents", None)))
    log.warning("realtime: cannot abort a connection that reads nothing (no transport found); its slot is freed")


async def close(ws, code: int, reason: str = "") -> None:
    try:
        await ws.close(code=code, reason=reason[:120])
    except Exception:  # already closed by the client
        pass



# ------------------------------------------------------------------------------------------------ realtime
_STOP, _FLUSH = object(), object()


class Connection:
    """One realtime WebSocket: a reader (this task) and a worker that runs the session's commands in the pool, in
    order. Appends that arrive while the worker is busy are fed together (in jobs of at most MAX_JOB_SECONDS).

    Backpressure: the reader never stops reading (so a disconnect is seen at once); the audio waiting for the
    worker is bounded by ``max_backlog_seconds`` (an append beyond gets an ``audio_backlog_exceeded`` error at once
    and is dropped), and while more than ``partials_behind_seconds`` wait, jobs are decoded without partials, which
    is most of a stream's compute: a stream that fell behind catches up and still gets every final.

    ``release`` frees the stream slot; it is called once, as soon as the stream is over (client gone, idle, or
    closed at shutdown), not after the job in flight: a client that reconnects at once must find its slot free.
    How many jobs decode at once stays bounded by the pool (``max_streams`` workers)."""

    def __init__(self, state: ServerState, ws, release=None):
        self.state, self.ws = state, ws
        self.inbox: deque = deque()
        self.wake = asyncio.Event()
        self.send_lock = asyncio.Lock()
        self.done = asyncio.Event()
        self.closed = False
        self.session = None
        self.backlog = 0  # bytes of audio appended and not yet decoded (queued, or in the job in flight)
        self._release = release

    def end_stream(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    @staticmethod
    async def send_raw(state, ws, events: list[dict]) -> bool:
        import json

        for event in events:
            if event.get("type") == "error":
                state.metrics.errors.labels(event["error"].get("code") or "error").inc()
            try:
                await asyncio.wait_for(ws.send_text(json.dumps(event, ensure_ascii=False)), SEND_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                logging.getLogger("megaedge.serve.requests").info(
                    "realtime: a client read nothing for %g s; its connection was aborted", SEND_TIMEOUT_SECONDS)
                state.metrics.errors.labels("client_not_reading").inc()
                _abort(ws)
                return False
            except Exception:  # the client went away
                return False
        return True

    async def send(self, events: list[dict]) -> None:
        if self.closed or not events:
            return
        async with self.send_lock:
            if not await self.send_raw(self.state, self.ws, events):
                self.closed = True

    def post(self, item) -> None:
        self.inbox.append(item)
        self.wake.set()

    def shutdown(self) -> None:
        self.post(_FLUSH)

    def _observe(self, kind: str, seconds: float, tokens: int) -> None:
        m = self.state.metrics
        m.hop_seconds.labels(kind).observe(seconds)
        if kind == "final":
            m.tokens.labels("realtime").inc(tokens)

    async def run(self) -> None:
        from megaedge.serve.protocol import RealtimeSession

        state = self.state
        try:
            self.session = await state.run(RealtimeSession, state.transcriber, state.stream_options(),
                                           state.config.model_name, self._observe)
            await self.send([self.session.created()])
            state.connections.add(self)
            reader = asyncio.create_task(self.read())
            worker = asyncio.create_task(self.work())
            finished, _ = await asyncio.wait({reader, worker}, return_when=asyncio.FIRST_COMPLETED)
            if worker in finished:  # shutdown: the worker flushed and closed
                reader.cancel()
            else:  # the client left (or idled out): drop what it queued, finish the job in flight
                self.inbox.clear()
                self.end_stream()
                self.post(_STOP)
            await asyncio.gather(reader, worker, return_exceptions=True)
            for task in (reader, worker):
                if not task.cancelled() and task.exception() is not None:
                    log.error("realtime connection failed", exc_info=task.exception())
        finally:
            self.end_stream()
            state.connections.discard(self)
            # The session holds this connection's bound _observe: dropping it here breaks the cycle, so the
            # stream's decoder state (its KV cache or fixed-KV slot) is freed when the socket closes, not at the
            # next cyclic garbage collection.
            self.session = None
            self.done.set()

    def _refuse(self, command, code: str, message: str) -> list[dict]:
        from megaedge.serve.protocol import error_event

        return [error_event(code, message, "audio" if code == "audio_backlog_exceeded" else None,
                            getattr(command, "event_id", None), kind="rate_limit_error")]

    def _admit(self, command) -> list[dict]:
        """Whether the reader may queue ``command`` (an event, or a reader's error event): [] if so, else the
        error to send at once (ahead of replies still queued: the client must learn to slow down now)."""
        if len(self.inbox) >= MAX_QUEUED_EVENTS:
            return self._refuse(command, "event_backlog_exceeded", f"{len(self.inbox)} events are waiting for "
                                "this connection's decoder; this one was dropped: send fewer, larger appends")
        if getattr(command, "kind", None) != "append":
            return []
        per_second = self.bytes_per_second()
        limit = self.state.config.max_backlog_seconds
        if self.backlog + len(command.audio) > limit * per_second:
            return self._refuse(command, "audio_backlog_exceeded",
                                f"{self.backlog / per_second:.2f} s of this connection's audio wait to be decoded and "
                                f"this append adds {len(command.audio) / per_second:.2f} s, over the server's limit "
                                f"of {limit:g} s; it was dropped: send audio at real-time pace")
        self.backlog += len(command.audio)
        return []

    def bytes_per_second(self) -> int:
        """Of the session's input format (as configured now: an update still queued is not counted)."""
        from megaedge.serve.protocol import SAMPLE_BYTES

        config = self.session.config
        return config.rate * SAMPLE_BYTES[config.format]

    async def read(self) -> None:
        from starlette.websockets import WebSocketDisconnect

        from megaedge.serve.protocol import ProtocolError, error_event, error_from, parse_client_event

        idle = self.state.config.idle_timeout
        while not self.closed:
            try:
                message = await asyncio.wait_for(self.ws.receive(), idle)
            except asyncio.TimeoutError:
                await self.send([error_event("idle_timeout", f"no event for {idle:g} s; closing",
                                             kind="invalid_request_error")])
                await close(self.ws, 1000, "idle timeout")
                return
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            size = len(text) if text is not None else len(message.get("bytes") or b"")
            limit = self.state.config.max_request_mb
            if size > self.state.config.max_request_bytes:
                item = error_event("message_too_large", f"a {size / 2**20:.1f} MiB message is over the server's "
                                   f"limit of {limit:g} MiB (--max-request-mb); it was dropped: send audio in "
                                   "smaller appends", kind="invalid_request_error")
            elif text is None:  # errors go through the worker too: replies keep the order of the client's events
                item = error_event("invalid_event", "binary frames are not events: send JSON text frames "
                                   "(audio as base64 in input_audio_buffer.append)")
            else:
                try:
                    item = parse_client_event(text)
                except ProtocolError as exc:
                    item = error_from(exc)
            refused = self._admit(item)
            if refused:
                await self.send(refused)
            else:
                self.post(item)

    async def work(self) -> None:
        from megaedge.serve.protocol import Command, ProtocolError, decode_audio, error_from

        session = self.session
        while True:
            while not self.inbox:
                self.wake.clear()
                await self.wake.wait()
            item = self.inbox.popleft()
            if item is _STOP:
                return
            if item is _FLUSH:
                events = await self.state.run(session.flush)
                await self.send(events)
                await close(self.ws, CLOSE_GOING_AWAY, "server shutting down")
                self.closed = True
                self.end_stream()
                return
            if isinstance(item, dict):  # an error event of the reader's
                await self.send([item])
                continue
            total = 0
            if item.kind == "append":
                # Appends are decoded here, in order, in the session's format as its updates left it.
                per_second = self.bytes_per_second()
                # Behind: more audio waits than partials_behind_seconds (this job's and what queued behind it).
                partials = self.backlog <= self.state.config.partials_behind_seconds * per_second
                parts, limit = [], int(MAX_JOB_SECONDS * per_second)
                while True:
                    try:
                        pcm = decode_audio(item.audio, session.config.format, item.event_id)
                    except ProtocolError as exc:  # an odd byte count of pcm16: that append alone is refused
                        if parts:  # ... in its turn, after the audio before it
                            self.inbox.appendleft(item)
                            break
                        self.backlog -= len(item.audio)
                        await self.send([error_from(exc)])
                        break
                    parts.append(pcm)
                    total += len(item.audio)
                    if not (self.inbox and total < limit and isinstance(self.inbox[0], Command)
                            and self.inbox[0].kind == "append"):
                        break
                    item = self.inbox.popleft()
                if not parts:
                    continue
                import numpy as np

                item = Command("append", pcm=np.concatenate(parts) if len(parts) > 1 else parts[0],
                               partials=partials)
                m = self.state.metrics
                m.audio_seconds.labels("realtime").inc(total / per_second)
                if not partials:
                    m.catch_up_seconds.inc(total / per_second)
            try:
                events = await self.state.run(session.run, item)
            except Exception:
                log.exception("realtime session %s: %s failed", session.id, item.kind)
                from megaedge.serve.protocol import error_event

                events = [error_event("server_error", f"{item.kind} failed on the server; the stream was reset",
                                      kind="server_error")]
                await self.state.run(session.clear)
            finally:
                self.backlog -= total
            await self.send(events)
