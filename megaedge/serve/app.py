"""The server: FastAPI routes over one shared ``Transcriber``, run under uvicorn (extra ``serve``).

* ``POST /v1/audio/transcriptions``: OpenAI's transcription endpoint (multipart ``file``, ``model``, ``language``,
  ``prompt``, ``response_format`` json | text | verbose_json | srt | vtt, ``include[]`` logprobs, ``temperature``
  0, ``stream``). The blocking ``transcribe`` runs in a thread pool of ``max_streams`` workers once a stream slot
  is free (admission.py).
* ``GET /v1/realtime?intent=transcription``: OpenAI's realtime transcription events (protocol.py); each
  connection holds a slot and owns one ``Stream``, fed in the same pool, one job at a time per connection.
* ``GET /health`` (503 until the bundle is loaded in the background), ``GET /metrics`` (Prometheus), ``GET /``
  (a web page streaming the microphone).

Everything that waits on the model runs in the pool; the event loop only moves bytes. ``serve()`` (server.py)
stops like this: no new work (503 / close 1001), each realtime connection's open utterance is finalised and sent,
then uvicorn's own shutdown waits for the HTTP requests in flight.
"""


import asyncio
import functools
import hmac
import json
import logging
import threading
import time
import zlib
from pathlib import Path

from megaedge.errors import AudioTooLongError, BundleError, Cancelled, ContextLengthError, MegaedgeError
from megaedge.runtime import output
from megaedge.serve.bodylimit import BodyLimit, TooLarge, error_body, too_large_body
from megaedge.serve.config import ServeConfig  # noqa: F401  (where callers have found it)
from megaedge.serve.realtime import serve_socket

log = logging.getLogger("megaedge.serve")
requests_log = logging.getLogger("megaedge.serve.requests")
TRANSCRIPTIONS = "/v1/audio/transcriptions"

STATIC = Path(__file__).resolve().parent / "static"
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
SUBTITLE_TYPES = {"srt": "text/plain", "vtt": "text/vtt"}  # what OpenAI's clients read as text
INCLUDES = ("logprobs",)  # OpenAI's include[]: per-token log-probabilities of the transcript
RETRY_AFTER_SECONDS = 1  # a 429's Retry-After: slots free as decodes end, which takes seconds, not minutes
IDLE_TRIM_SECONDS = 10.0  # with no stream decoding for this long, freed memory is handed back (memory.py)


class ServerState:
    """What the routes share: config, the transcriber (None until loaded), slots, the pool, metrics, sessions."""

    def __init__(self, config: ServeConfig, transcriber=None):
        from megaedge.serve.admission import Admission
        from megaedge.serve.metrics import Metrics

        self.config = config
        self.metrics = Metrics()
        self.admission = Admission(config.max_streams, config.queue)
        self.transcriber = transcriber
        self.load_error: str | None = None
        self.on_load_error = None  # callable(message), e.g. stop the server
        self.connections: set = set()
        self.draining = False
        self.executor = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.info: dict = {}
        self.decoding = self.decoding_peak = 0  # pool jobs running now / at most so far (never > max_streams)
        self.jobs = 0  # pool jobs finished
        self._jobs_lock = threading.Lock()
        self._trimmer: asyncio.Task | None = None
        if transcriber is not None:
            self._loaded(transcriber, 0.0)

    # -- loading
    def start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.loop = asyncio.get_running_loop()
        self.executor = ThreadPoolExecutor(max_workers=self.config.max_streams, thread_name_prefix="megaedge-serve")
        if self.transcriber is None:
            threading.Thread(target=self._load, name="megaedge-serve-load", daemon=True).start()
        self._trimmer = asyncio.create_task(self._trim_when_idle())

    async def _trim_when_idle(self) -> None:
        """Once per idle spell (no slot held, no job running, jobs done since the last trim): malloc_trim."""
        from megaedge.serve import memory

        trimmed_at = 0
        while True:
            await asyncio.sleep(IDLE_TRIM_SECONDS)
            if self.jobs != trimmed_at and self.admission.active == 0 and self.decoding == 0:
                trimmed_at = self.jobs
                await asyncio.to_thread(memory.trim)

    def _load(self) -> None:
        from megaedge.runtime.transcriber import Transcriber

        c = self.config
        t0 = time.perf_counter()
        try:
            # A pin is checked again here (the files may have been swapped since), and makes prepared copies count
            # only when sealed (runtime/prepared.py).
            tr = Transcriber.from_bundle(c.bundle, options=c.runtime_options())
            tr.create_stream(self.stream_options())  # a bad preset, or spans a fixed KV buffer cannot hold, fail here
        except MegaedgeError as exc:
            self.load_error = str(exc)
        except Exception as exc:  # a bug, or a library's own error: keep the traceback in the log
            log.exception("loading %s failed", c.bundle)
            self.load_error = f"{type(exc).__name__}: {exc}"
        if self.load_error is not None:
            log.error("cannot load the bundle %s: %s", c.bundle, self.load_error)
            if self.on_load_error:
                self.on_load_error(self.load_error)
            return
        self._loaded(tr, time.perf_counter() - t0)

    def _loaded(self, tr, seconds: float) -> None:
        from megaedge.runtime import manifest

        m = tr.manifest
        try:
            digest = manifest.bundle_digest(self.config.bundle)  # which bundle a running service has (pin it)
        except (OSError, MegaedgeError):
            digest = None
        self.info = {"bundle": str(self.config.bundle), "model": self.config.model_name, "mode": m.mode,
                     "precision": m.precision, "routed": m.routed, "route": tr.route,
                     "vad": type(tr.vad).__name__ if tr.vad is not None else None,
                     "megaedge_version": m.megaedge_version, "bundle_digest": digest,
                     "load_seconds": round(seconds, 3),
                     "max_streams": self.config.max_streams, "max_queue": self.config.queue}
        self.transcriber = tr
        if tr.batcher is not None:
            tr.batcher.on_batch = self.metrics.batch_size.observe
        self.metrics.model_loaded.set(1)
        log.info("bundle %s (digest %s) loaded in %.2f s", self.config.bundle, digest, seconds)

    def stream_options(self):
        from dataclasses import replace

        from megaedge.runtime.streaming import StreamOptions

        return replace(StreamOptions.preset(self.config.preset), route=None)

    # -- auth
    def authorized(self, headers, query=None) -> bool:
        key = self.config.api_key
        if not key:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return True
        given = query.get("api_key") if query is not None else None
        return bool(given) and hmac.compare_digest(given.encode(), key.encode())

    # -- slots
    def set_gauges(self) -> None:
        self.metrics.queued_requests.set(self.admission.queued)

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._job, fn, args)

    def _job(self, fn, args):
        with self._jobs_lock:
            self.decoding += 1
            self.decoding_peak = max(self.decoding_peak, self.decoding)
        try:
            return fn(*args)
        finally:
            with self._jobs_lock:
                self.decoding -= 1
                self.jobs += 1

    async def drain(self, timeout: float) -> None:
        """Stop taking work; finalise every realtime connection's open utterance and close it (1001)."""
        self.draining = True
        connections = list(self.connections)
        if connections:
            log.info("shutting down: finishing %d realtime connection(s)", len(connections))
        for conn in connections:
            conn.shutdown()
        waits = [conn.done.wait() for conn in connections]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), timeout)
            except asyncio.TimeoutError:
                log.warning("shutdown: %d realtime connection(s) did not finish in %.0f s",
                            sum(not c.done.is_set() for c in connections), timeout)

    def close(self) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()
        if self.executor is not None:
            # Decodes still running past --shutdown-timeout cannot be stopped inside onnxruntime; waiting for them
            # here would hold the exit for as long as they take (serve() ends the process without them). Their
            # requests have been answered 503.
            if self.decoding:
                log.warning("shutdown: %d decode(s) still running; exiting without waiting for them", self.decoding)
            self.executor.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ the app
def create_app(config: ServeConfig, transcriber=None):
    """The FastAPI application. ``transcriber``: an already loaded one (tests), else the bundle loads in the
    background at startup and /health answers 503 until it has."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request, WebSocket
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

    state = ServerState(config, transcriber)

    @asynccontextmanager
    async def lifespan(app):
        state.start()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(title="megaedge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.megaedge = state

    def rejected(path: str) -> None:
        state.metrics.errors.labels("request_too_large").inc()
        requests_log.info("413 request_too_large: %s over %g MiB", path, config.max_request_mb)
        if path == TRANSCRIPTIONS:
            state.metrics.requests.labels("transcription", "413").inc()

    app.add_middleware(BodyLimit, limit=config.max_request_bytes, on_reject=rejected)

    def error(status: int, message: str, code: str, kind: str = "invalid_request_error", param=None, headers=None):
        state.metrics.errors.labels(code).inc()
        requests_log.info("%d %s: %s", status, code, message)  # -v: why a client was refused
        return JSONResponse(error_body(message, code, kind, param), status_code=status, headers=headers)

    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        """404 / 405 and the like in OpenAI's error body, as every other error here (FastAPI says {"detail"})."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        state.metrics.errors.labels(code).inc()
        requests_log.info("%d %s: %s %s", exc.status_code, code, request.method, request.url.path)
        body = error_body(f"{exc.detail}: {request.method} {request.url.path}", code)
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(TooLarge)
    async def too_large(request, exc):
        state.metrics.errors.labels("request_too_large").inc()
        requests_log.info("413 request_too_large: over %g MiB", config.max_request_mb)
        return JSONResponse(too_large_body(config.max_request_mb), status_code=413,
                            headers={"connection": "close"})

    @app.get("/health")
    async def health():
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if state.transcriber is None:
            return JSONResponse({"status": "loading", "bundle": str(config.bundle)}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "shutting_down", **state.info}, status_code=503)
        return {"status": "ok", **state.info, "active_streams": state.admission.active,
                "queued_requests": state.admission.queued}

    @app.get("/metrics")
    async def metrics():
        state.set_gauges()
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(name: str):
        path = STATIC / name
        if name not in {p.name for p in STATIC.iterdir()} or not path.is_file():
            return error(404, f"no such file {name!r}", "not_found")
        kind = "text/javascript" if name.endswith(".js") else "text/css" if name.endswith(".css") else None
        return FileResponse(path, media_type=kind)

    @app.get("/v1/models")
    async def models(request: Request):
        if not state.authorized(request.headers):
            return error(401, "missing or wrong API key: send Authorization: Bearer KEY", "invalid_api_key")
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "megaedge"}]}

    @app.post(TRANSCRIPTIONS)
    async def transcriptions(request: Request):
        """Every outcome counted in megaedge_requests_total by its status (a 413 while the body streams in too)."""
        try:
            response = await _transcriptions(request)
        except asyncio.CancelledError:  # uvicorn ends requests still open when --shutdown-timeout runs out
            log.warning("shutdown: a transcription request did not finish in --shutdown-timeout; answered 503")
            response = error(503, SHUTDOWN_MESSAGE, "server_shutting_down", "server_error")
        except TooLarge:
            state.metrics.requests.labels("transcription", "413").inc()
            raise
        except Exception:  # a bug: Starlette answers 500
            state.metrics.requests.labels("transcription", "500").inc()
            raise
        if not getattr(response, "megaedge_events", False):  # counted by its outcome when it ends
            state.metrics.requests.labels("transcription", str(getattr(response, "status_code", 200))).inc()
        return response

    async def _transcriptions(request: Request):
        t0 = time.perf_counter()
        if not state.authorized(request.headers):
            return error(401, "missing or wrong API key: send Authorization: Bearer KEY", "invalid_api_key")
        if state.transcriber is None or state.draining:
            why = state.load_error or ("shutting down" if state.draining else "the model is still loading")
            return error(503, f"not ready: {why}", "not_ready", "server_error")
        try:
            form = await request.form(max_files=1, max_fields=32)
        except TooLarge:
            raise
        except Exception as exc:  # starlette's MultiPartException, or a body that is not a form
            return error(400, f"cannot read the multipart form ({exc})", "invalid_form")
        try:
            request_fields = _form_fields(form)
            if isinstance(request_fields, tuple):
                return error(400, *request_fields)
            upload = form.get("file")
            data = await upload.read()
            name = getattr(upload, "filename", None) or "audio"
        finally:
            await form.close()
        # A client that leaves (a timeout, Ctrl-C) cancels its decode: the slot is free again within a step.
        cancel, left = threading.Event(), asyncio.Event()
        watcher = asyncio.create_task(_client_gone(request, cancel, left))
        response = None
        try:
            response = await _transcribe(request_fields, data, name, t0, cancel, watcher, left)
            return response
        except asyncio.CancelledError:  # the shutdown timeout: stop the decode running for this request too
            cancel.set()
            raise
        finally:
            if not getattr(response, "megaedge_events", False):  # a stream's events watch the client until they end
                watcher.cancel()

    async def _transcribe(fields: dict, data: bytes, name: str, t0: float, cancel: threading.Event, watcher,
                          left: asyncio.Event):
        tr = state.transcriber
        try:
            language, context = tr.check_request(fields["language"], fields["prompt"])
        except MegaedgeError as exc:
            return error(400, str(exc), "invalid_value", param="language" if fields["language"] else "prompt")
        from megaedge.runtime import audio as audio_io
        from megaedge.serve.admission import Busy

        # The upload is decoded from memory, never stored under a name: nothing of a client's audio outlives its
        # request, whatever ends the server (the form parser's spool file has no name and goes with the process).
        label = _upload_label(name)
        too_long = (f"this server transcribes at most {config.max_audio_seconds:g} s per request (megaedge serve "
                    "--max-audio-seconds)")
        # Decoding is bounded in samples too, not only seconds: a few kB of compressed silence at 655 kHz x 8
        # channels would decode to gigabytes within the time limit.
        budget = int(config.max_audio_seconds * DECODED_SAMPLES_PER_SECOND)
        try:
            info = await asyncio.to_thread(audio_io.check_bytes, data, label)
            audio_io.check_decoded_size(info, label, None, budget)
        except AudioTooLongError as exc:
            return error(400, f"{exc}; {too_long}", "audio_too_long", param="file")
        except MegaedgeError as exc:
            return error(400, str(exc), "invalid_audio", param="file")
        # A streaming encoder's file has no length until it is decoded, which happens in its slot, as every decode
        duration = None if audio_io.unknown_length(info) else info.frames / info.samplerate
        if duration is not None and duration > config.max_audio_seconds:
            return error(400, f"the audio is {duration:.1f} s long; {too_long}", "audio_too_long", param="file")
        try:
            state.metrics.queued_requests.set(state.admission.queued + 1)
            if not await _unless(state.admission.acquire(), left):  # a client gone leaves the queue at once
                return error(499, "the client closed the connection while its request was queued",
                             "client_closed_request")
        except Busy:
            return error(429, f"server busy: {config.max_streams} streams in use and {config.queue} requests "
                         f"queued; retry in {RETRY_AFTER_SECONDS} s", "rate_limit_exceeded", "rate_limit_error",
                         headers={"retry-after": str(RETRY_AFTER_SECONDS)})
        finally:
            state.set_gauges()
        active = state.metrics.active_streams.labels("transcription")
        active.inc()
        segments = asyncio.Queue() if fields["stream"] else None
        loop = asyncio.get_running_loop()
        on_segment = None if segments is None else (lambda seg: loop.call_soon_threadsafe(segments.put_nowait,
                                                                                          seg))
        job = asyncio.ensure_future(state.run(lambda: tr.transcribe(
            audio_io.read_bytes(data, label, max_seconds=config.max_audio_seconds, max_samples=budget, info=info),
            language=language, context=context, cancel=cancel, on_segment=on_segment)))

        def finished(done) -> None:  # the slot and the upload are the decode's until it has ended
            if not done.cancelled():
                done.exception()  # read: a failure is answered by its awaiter, or by nobody (client gone)
            active.dec()
            state.admission.release()
            state.set_gauges()

        job.add_done_callback(finished)

        def failed(exc: BaseException):
            """The error response for a failed job, or None for a bug (re-raised)."""
            if isinstance(exc, Cancelled):  # nobody reads this answer; the log and the metrics do
                return error(499, f"the client closed the connection; its decode was stopped after "
                             f"{time.perf_counter() - t0:.1f} s", "client_closed_request")
            if isinstance(exc, ContextLengthError):  # the audio and the prompt together: name the one chosen
                return error(400, str(exc), "context_length_exceeded", param="prompt" if context else "file")
            if isinstance(exc, AudioTooLongError):  # a file of unknown length, found while it was decoded
                return error(400, f"{exc}; {too_long}", "audio_too_long", param="file")
            if isinstance(exc, BundleError):  # the server's problem, and its paths are its own: the log says
                log.error("a transcription failed on the bundle: %s", exc)
                return error(500, "the server's bundle could not transcribe this request (its log says why)",
                             "server_error", "server_error")
            if isinstance(exc, MegaedgeError):
                return error(400, str(exc), "invalid_audio", param="file")
            return None

        def observe(result) -> None:
            nonlocal duration
            m = state.metrics
            m.request_seconds.observe(time.perf_counter() - t0)
            m.tokens.labels("transcription").inc(len(result.token_ids))
            m.decode_seconds.inc(result.timings.get("decode", 0.0))
            if duration is None:
                duration = result.timings["audio_seconds"]
                usage["seconds"] = round(duration, 3)
            m.audio_seconds.labels("transcription").inc(duration)

        usage = {"type": "duration", "seconds": None if duration is None else round(duration, 3)}
        # include[]=logprobs: the text tokens of each segment, as OpenAI's logprobs
        confidence = functools.partial(_token_logprobs, tr) if fields["logprobs"] else None
        if segments is not None:
            return _event_stream(_stream_events(job, segments, cancel, watcher, failed, observe, usage, state,
                                                confidence), state)
        try:
            result = await asyncio.shield(job)  # a cancelled handler (shutdown) leaves the job to its cancel
        except Exception as exc:
            response = failed(exc)
            if response is None:
                raise
            return response
        observe(result)
        fmt = fields["response_format"]
        if fmt == "text":
            return PlainTextResponse(result.text)
        if fmt in output.SUBTITLE_FORMATS:
            return PlainTextResponse(output.subtitles(result.segments, fmt), media_type=SUBTITLE_TYPES[fmt])
        body = {"text": result.text} if fmt == "json" else _verbose(result, duration, fields["model"])
        if confidence is not None:
            body["logprobs"] = confidence(result.segments)
        if fmt == "json":
            body["usage"] = usage
        return body

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        await serve_socket(state, ws)

    return app


DECODED_SAMPLES_PER_SECOND = 48000 * 2  # an upload decodes to at most --max-audio-seconds of 48 kHz stereo


SHUTDOWN_MESSAGE = ("the server shut down before this transcription finished (megaedge serve --shutdown-timeout); "
                    "send it again")


@functools.lru_cache(maxsize=1)
def _event_stream_class():
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        """``stream=true``: OpenAI's transcription events as server-sent events. A stream still open when
        --shutdown-timeout runs out ends with an ``error`` event, not a cut connection and a traceback."""

        megaedge_events = True  # counted, and its client watched, until the events end

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            except asyncio.CancelledError:
                if not self.state.draining:
                    raise
                body = error_body(SHUTDOWN_MESSAGE, "server_shutting_down", "server_error")
                try:
                    await send({"type": "http.response.body", "more_body": False, "body": _sse(body).encode()})
                except Exception:  # the connection is gone too
                    pass

    return EventStream


def _sse(body: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _event_stream(events, state):
    response = _event_stream_class()(events, media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
    response.state = state
    return response


async def _stream_events(job, segments: asyncio.Queue, cancel: threading.Event, watcher, failed, observe,
                         usage: dict, state, confidence=None):
    """A ``transcript.text.delta`` per segment as it is decoded (the deltas add up to the final text exactly), then
    ``transcript.text.done`` with the text and usage, or an ``error`` event. A client that leaves stops the decode
    (``cancel``); the outcome is counted once, when the stream ends: 200, the error's status, 499 for a client
    gone, 503 for one cut by --shutdown-timeout."""

    texts, sent, outcome, getter, spelled = [], "", None, None, []
    try:
        while True:
            if segments.empty() and job.done():
                break
            getter = asyncio.ensure_future(segments.get())
            await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            seg = getter.result()
            if seg.text:
                texts.append(seg.text)
            entries = confidence([seg]) if confidence is not None else None
            spelled += entries or []  # done's logprobs: every segment's, each computed once
            so_far = " ".join(texts).strip()  # as Result.text joins segments
            if so_far.startswith(sent) and len(so_far) > len(sent):
                delta = {"type": "transcript.text.delta", "delta": so_far[len(sent):]}
                if entries is not None:
                    delta["logprobs"] = entries
                yield _sse(delta)
                sent = so_far
        exc = job.exception()
        if exc is not None:
            response = failed(exc)  # counts its error code
            if response is None:
                outcome = "500"
                log.error("a streamed transcription failed", exc_info=exc)
                yield _sse(error_body("the transcription failed on the server", "server_error", "server_error"))
                return
            outcome = str(response.status_code)
            yield _sse(json.loads(response.body))
            return
        result = job.result()
        observe(result)
        outcome = "200"
        done = {"type": "transcript.text.done", "text": result.text, "usage": usage}
        if confidence is not None:
            done["logprobs"] = spelled
        yield _sse(done)
    finally:
        if getter is not None and not getter.done():
            getter.cancel()
        watcher.cancel()
        if not job.done():
            cancel.set()
        if outcome is None:  # ended from outside: the client left, or the shutdown timeout cut it
            outcome, code = ("503", "server_shutting_down") if state.draining else ("499", "client_closed_request")
            state.metrics.errors.labels(code).inc()
            requests_log.info("%s %s: a streamed transcription ended early", outcome, code)
        state.metrics.requests.labels("transcription", outcome).inc()


async def _client_gone(request, cancel: threading.Event, left: asyncio.Event) -> None:
    """Set ``cancel`` and ``left`` when the client disconnects: once a request's body is read, the server's next
    receive message is the disconnect (or comes once the response is sent, when this task is already cancelled)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            left.set()
            return


async def _unless(acquiring, left: asyncio.Event) -> bool:
    """Await ``acquiring`` (a slot) unless ``left`` is set first: True with the slot, False without one."""
    slot, gone = asyncio.ensure_future(acquiring), asyncio.ensure_future(left.wait())
    try:
        await asyncio.wait({slot, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not slot.done():
            slot.cancel()  # Admission passes on a slot handed over in the same instant
    await asyncio.gather(slot, return_exceptions=True)
    if slot.cancelled():
        return False
    slot.result()  # Busy
    return True


def _form_fields(form) -> dict | tuple:
    """The request's fields, or (message, code, kind, param) for a 400."""
    from starlette.datastructures import UploadFile

    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        return ("'file' is required: the audio as a multipart file", "missing_file", "invalid_request_error", "file")

    def text(name):
        value = form.get(name)
        return value.strip() if isinstance(value, str) and value.strip() else None

    fmt = text("response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        return (f"response_format {fmt[:40]!r} is not supported; use one of {', '.join(RESPONSE_FORMATS)}",
                "invalid_value", "invalid_request_error", "response_format")
    temperature = text("temperature")
    if temperature is not None:
        try:
            ok = float(temperature) == 0.0
        except ValueError:
            ok = False
        if not ok:
            return (f"temperature {temperature[:20]!r}: megaedge decodes greedily; send 0 or leave it out",
                    "invalid_value", "invalid_request_error", "temperature")
    stream = (text("stream") or "false").lower()
    if stream not in ("false", "0", "true", "1"):
        return (f"stream {stream[:20]!r} is not true or false", "invalid_value", "invalid_request_error", "stream")
    stream = stream in ("true", "1")
    if stream and fmt not in ("json", "text"):
        return (f"stream=true sends transcript.text events, not {fmt}; use response_format json or text, "
                "or leave stream out", "invalid_value", "invalid_request_error", "response_format")
    granularities = [g for g in form.getlist("timestamp_granularities[]") if isinstance(g, str)]
    if any(g != "segment" for g in granularities):
        return ("timestamp_granularities: only 'segment' is supported", "invalid_value", "invalid_request_error",
                "timestamp_granularities[]")
    include = {g.strip() for key in ("include[]", "include") for g in form.getlist(key) if isinstance(g, str)}
    include.discard("")
    unknown = sorted(include - set(INCLUDES))
    if unknown:
        return (f"include {unknown[0][:40]!r} is not supported; the one this server has is 'logprobs'",
                "invalid_value", "invalid_request_error", "include[]")
    if include and not stream and fmt not in ("json", "verbose_json"):
        return (f"include logprobs needs response_format json or verbose_json, or stream=true; not {fmt}",
                "invalid_value", "invalid_request_error", "include[]")
    return {"model": text("model"), "language": text("language"), "prompt": text("prompt"),
            "response_format": fmt, "stream": stream, "logprobs": "logprobs" in include}


def _token_logprobs(tr, segments) -> list[dict]:
    return [entry for s in segments for entry in output.token_logprobs(tr, s)]


def _upload_label(name: str) -> str:
    """What messages call an upload: the client's file name, printable and short (it is the client's own)."""
    name = "".join(ch for ch in name if ch.isprintable())[:80]
    return repr(name) if name else "the uploaded file"


def _compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return round(len(raw) / len(zlib.compress(raw)), 4) if raw else 0.0


def _verbose(result, duration: float, model: str | None) -> dict:
    segments = []
    for i, s in enumerate(result.segments):
        segments.append({
            "id": i, "seek": round(s.start * 100), "start": s.start, "end": s.end, "text": s.text,
            "tokens": list(s.token_ids), "temperature": 0.0, "avg_logprob": s.mean_logprob,
            "compression_ratio": _compression_ratio(s.text), "no_speech_prob": 0.0 if s.speech else 1.0,
            "route": s.route, "degraded_prob": s.degraded_prob, "mean_logprob": s.mean_logprob,
            "min_logprob": s.min_logprob, "loop_guard": s.loop_guard, "language": s.language})
    language = (result.language or "").lower() or None
    return {"task": "transcribe", "language": language, "duration": round(duration, 3), "text": result.text,
            "segments": segments, "usage": {"type": "duration", "seconds": round(duration, 3)}, "model": model,
            "route": result.route, "degraded_prob": result.degraded_prob, "mean_logprob": result.mean_logprob,
            "min_logprob": result.min_logprob, "loop_guard": result.loop_guard}
