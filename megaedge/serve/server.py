"""The server process around the app (serve/app.py): the socket bound and the bundle checked before uvicorn starts,
so that each of those failures is one line; uvicorn run until SIGINT / SIGTERM, its shutdown finishing the
realtime connections' open utterances first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from megaedge.errors import MegaedgeError
from megaedge.serve.app import ServeConfig, ServerState, create_app

log = logging.getLogger("megaedge.serve")


FLUSH_SECONDS = 2.0  # after the shutdown timeout: for cut responses to reach their clients


def make_server(config: ServeConfig, transcriber=None, log_level: str = "warning", access_log: bool = False):
    """A uvicorn server for ``config`` whose shutdown finishes the realtime connections' open utterances first."""
    import uvicorn

    app = create_app(config, transcriber)
    state: ServerState = app.state.megaedge

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            log.info("shutting down: no new work; open utterances and requests finish (--shutdown-timeout %g s)",
                     config.shutdown_timeout)
            await state.drain(config.shutdown_timeout)
            await super().shutdown(sockets)
            # The requests uvicorn cancelled at the timeout are still sending their last words (a stream's error
            # event), and serve() may end the process without waiting for running decodes: let those tasks end
            # and their connections flush and close first, for at most FLUSH_SECONDS.
            loop = asyncio.get_running_loop()
            until = loop.time() + FLUSH_SECONDS
            while (self.server_state.tasks or self.server_state.connections) and loop.time() < until \
                    and not self.force_exit:  # a second Ctrl-C: now
                await asyncio.sleep(0.02)

        @contextlib.contextmanager
        def capture_signals(self):
            """SIGHUP (the terminal closed, a supervisor's reload) drains as SIGTERM does; uvicorn only takes
            SIGINT and SIGTERM, and a hang-up killed the server with requests and utterances in flight."""
            hangup = getattr(signal, "SIGHUP", None)
            inherited = signal.getsignal(hangup) if hangup is not None else None
            if hangup is None or threading.current_thread() is not threading.main_thread() or \
                    inherited in (signal.SIG_IGN, None):  # nohup: hang-ups are to be ignored, so they are
                with super().capture_signals():
                    yield
                return
            original = signal.signal(hangup, self.handle_exit)
            try:
                with super().capture_signals():
                    yield
            finally:
                signal.signal(hangup, original)
            if hangup in self._captured_signals:
                signal.raise_signal(hangup)  # drained: now end as a hang-up ends a process

    uconfig = uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, lifespan="on",
                             access_log=access_log,
                             ws_max_size=config.ws_frame_bytes,
                             timeout_graceful_shutdown=config.shutdown_timeout, server_header=False)
    server = Server(uconfig)
    server.megaedge = state

    def stop(message: str) -> None:
        server.should_exit = True

    state.on_load_error = stop
    return server


def listen(host: str, port: int):
    """The server's socket, bound here so that a busy port or an address this machine does not have is one
    line (MegaedgeError) before uvicorn starts, not uvicorn's log and exit status 3."""
    import errno
    import socket

    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise MegaedgeError(f"--host {host!r} is not an address ({exc.strerror}); use an address of this machine, "
                            "e.g. 127.0.0.1, or 0.0.0.0 for all") from None
    # A name (localhost) may resolve to ::1 first; uvicorn bound IPv4 for any host without a colon, so IPv4 comes
    # first here, and each address is tried until one binds.
    found.sort(key=lambda info: info[0] != socket.AF_INET)
    failure = None
    for family, kind, proto, _, address in found:
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            failure = failure or exc
            continue
        sock.set_inheritable(True)
        return sock
    fix = ("stop what listens there or pick another --port" if failure.errno == errno.EADDRINUSE else
           "use an address of this machine, e.g. 127.0.0.1, or 0.0.0.0 for all")
    raise MegaedgeError(f"cannot listen on {host}:{port} ({failure.strerror}); {fix}") from None


def check_bundle(config: ServeConfig) -> ServeConfig:
    """What loading checks (the VAD choice, the pin, the manifest and, unless --no-verify, every file's digest),
    checked before the server starts, so that each failure is one line (MegaedgeError), not a server that starts
    and stops; the config the background load then uses (unpinned, the digests are not hashed twice)."""
    from dataclasses import replace

    from megaedge.runtime import options as runtime_options
    from megaedge.runtime.session import resolve_providers
    from megaedge.runtime.transcriber import checked_bundle

    info, _ = checked_bundle(Path(config.bundle), config.verify, config.expected_digest, config.vad)
    # The providers and the forced engines too: --providers cuda without onnxruntime-gpu, or --decode native on a
    # bundle without native weights, is one line here rather than a server that starts, logs and stops.
    opts = config.runtime_options()
    resolve_providers([p for p in opts.providers if p != "engine"])
    if "engine" in opts.providers and not info.engines:
        raise MegaedgeError(f"{config.bundle}: no TensorRT engines; run megaedge build-engines {config.bundle} first")
    runtime_options.select(Path(config.bundle), info, opts, advise=False)
    # The background load need not hash the files again, unless pinned: a pinned load also decides whether the
    # prepared copies' record is sealed (with a sealed record it does not hash them either).
    return config if config.expected_digest is not None else replace(config, verify=False)


def serve(config: ServeConfig, log_level: str = "info", access_log: bool = False) -> int:
    """Run until SIGINT / SIGTERM; raises MegaedgeError when the address cannot be had or the bundle cannot be
    loaded."""
    from megaedge.serve import memory

    config = check_bundle(config)
    sock = listen(config.host, config.port)
    memory.tune()  # before any thread of the server's allocates: see memory.py
    server = make_server(config, log_level=log_level, access_log=access_log)
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)
    if not config.api_key and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it (--api-key)", config.host)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        _end_without_running_decodes(server.megaedge, 130)
        raise
    _end_without_running_decodes(server.megaedge, 0)
    if server.megaedge.load_error:
        raise MegaedgeError(f"cannot load {config.bundle}: {server.megaedge.load_error}")
    return 0


def _end_without_running_decodes(state: ServerState, status: int) -> None:
    """Decodes still running after the shutdown (past --shutdown-timeout, their requests answered 503) would hold
    the exit: the interpreter joins the worker threads, and onnxruntime cannot be interrupted. End the process
    now, as SIGTERM's default action would."""
    if state.decoding:
        if status == 130:
            print("megaedge serve: interrupted", file=sys.stderr)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def env_api_key() -> str | None:
    return os.environ.get("MEGAEDGE_API_KEY") or None
