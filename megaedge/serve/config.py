"""``megaedge serve``'s settings: one frozen dataclass whose every value is checked when it is made (ranges, types,
the engine and preset choices), from the CLI or from Python (the CLI's argument types are the same checks)."""

from __future__ import annotations

from dataclasses import dataclass

from megaedge.runtime.limits import check_int, check_seconds

DAY = 86_400


def port(value):
    return check_int(value, "port", 0, 65535, "0 picks a free port")


def max_streams(value):
    return check_int(value, "max-streams", 1, 1024)


def max_queue(value):
    return check_int(value, "max-queue", 0, 100_000)


def max_request_mb(value):
    return check_seconds(value, "max-request-mb", 0, 4096, fix="e.g. 25", unit="MiB")


def max_audio_seconds(value):
    return check_seconds(value, "max-audio-seconds", 0, DAY, fix="e.g. 600")


def idle_timeout(value):
    return check_seconds(value, "idle-timeout", 0, DAY, fix="seconds without a client event, e.g. 60")


def shutdown_timeout(value):
    return check_seconds(value, "shutdown-timeout", 0, DAY, fix="seconds to finish open work on SIGTERM, e.g. 30")


def _wait(name: str):
    return lambda value: check_seconds(value, name, 0, 600, low_inclusive=True)


CHECKS = {"port": port, "max_streams": max_streams, "max_request_mb": max_request_mb,
          "max_audio_seconds": max_audio_seconds, "idle_timeout": idle_timeout, "shutdown_timeout": shutdown_timeout,
          "slot_wait_seconds": _wait("slot_wait_seconds"), "partials_behind_seconds": _wait("partials_behind_seconds"),
          "max_backlog_seconds": _wait("max_backlog_seconds")}


@dataclass(frozen=True)
class ServeConfig:
    bundle: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_streams: int = 4
    max_queue: int | None = None  # transcription requests waiting for a slot (None: max_streams)
    api_key: str | None = None
    providers: tuple[str, ...] = ("cpu",)
    threads: int | None = None
    decode: str = "auto"
    prefill: str = "auto"
    stem: str = "auto"
    kv_cache: str = "float32"
    vad: str | None = None
    route: str = "auto"
    verify: bool = True
    expected_digest: str | None = None  # refuse any bundle but this one (--expect-digest)
    max_request_mb: float = 25.0
    max_audio_seconds: float = 600.0
    idle_timeout: float = 60.0
    preset: str = "balanced"
    model_name: str = "megaedge"
    shutdown_timeout: float = 30.0
    # realtime: a new connection waits this long for a slot before it is refused (one being released, e.g. by
    # the same client's previous connection, whose disconnect the server may see just after the new handshake)
    slot_wait_seconds: float = 1.0
    # realtime: with more than this much of a connection's audio waiting, it is decoded without partials (finals
    # only) until the connection has caught up; beyond max_backlog_seconds an append is refused with an error
    partials_behind_seconds: float = 2.0
    max_backlog_seconds: float = 30.0

    @property
    def queue(self) -> int:
        return self.max_streams if self.max_queue is None else self.max_queue

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    @property
    def ws_frame_bytes(self) -> int:
        """The WebSocket protocol's own message limit: above --max-request-mb, so that a message somewhat over it
        reaches the reader and is refused with an error event (the connection stays); only one past this closes
        the connection with 1009 and no event."""
        limit = self.max_request_bytes
        return max(limit + min(limit, 64 << 20), 1 << 20)

    def runtime_options(self):
        """The Transcriber's options this server loads with (RuntimeOptions checks each engine choice)."""
        from megaedge.runtime.options import RuntimeOptions

        # No onnxruntime memory pool: a server's requests vary in shape and the pool only grows (serve/memory.py).
        return RuntimeOptions(providers=self.providers, threads=self.threads, decode=self.decode,
                              prefill=self.prefill, stem=self.stem, route=self.route, verify=self.verify,
                              vad=self.vad, kv_cache=self.kv_cache, memory_arena=False,
                              expected_digest=self.expected_digest)

    def __post_init__(self):
        from megaedge.errors import MegaedgeError

        for name, check in CHECKS.items():
            object.__setattr__(self, name, check(getattr(self, name)))  # frozen: the checked number is kept
        if self.max_queue is not None:
            object.__setattr__(self, "max_queue", max_queue(self.max_queue))
        if not isinstance(self.bundle, str) or not self.bundle:
            raise MegaedgeError(f"bundle {self.bundle!r} is not a path; pass the bundle's folder as a string")
        if isinstance(self.providers, str) or not all(isinstance(p, str) for p in self.providers):
            raise MegaedgeError(f"providers {self.providers!r} is not a tuple of names, e.g. ('cpu',)")
        for name in ("host", "model_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise MegaedgeError(f"{name} {getattr(self, name)!r} is not a non-empty string")
        for name in ("api_key", "expected_digest"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise MegaedgeError(f"{name} {getattr(self, name)!r} is not a string (or None)")
        if self.expected_digest is not None:
            from megaedge.runtime.manifest import pinned_digest

            pinned_digest(self.expected_digest, "expected_digest")
        # The engine and stream choices: what the load would refuse, refused now (the same checks).
        from megaedge.runtime.streaming import PRESETS

        engines = self.runtime_options()
        object.__setattr__(self, "providers", engines.providers)
        object.__setattr__(self, "threads", engines.threads)
        if self.preset not in PRESETS or self.preset == "exact":
            raise MegaedgeError(f"preset {self.preset!r}: realtime sessions take balanced, interactive or dictation")
        if self.max_backlog_seconds < self.partials_behind_seconds:
            raise MegaedgeError(f"max_backlog_seconds {self.max_backlog_seconds:g} is under partials_behind_seconds "
                                f"{self.partials_behind_seconds:g}; the backlog limit must be the larger")
