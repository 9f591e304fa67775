"""Prometheus metrics of one server (a registry of its own, so several applications can live in one process)."""

from __future__ import annotations

# Hop and request latencies: from a 20 ms hop of a tiny model to a minute-long file on a small CPU.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)  # runtime/batching.py: at most 16 steps a call


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.model_loaded = Gauge("megaedge_model_loaded", "1 once the bundle is loaded", registry=registry)
        self.active_streams = Gauge("megaedge_active_streams", "stream slots in use",
                                    ["kind"], registry=registry)  # kind: realtime | transcription
        self.queued_requests = Gauge("megaedge_queued_requests", "transcription requests waiting for a stream slot",
                                     registry=registry)
        self.request_seconds = Histogram("megaedge_request_seconds",
                                         "POST /v1/audio/transcriptions latency (queue wait included)",
                                         buckets=LATENCY_BUCKETS, registry=registry)
        self.hop_seconds = Histogram("megaedge_stream_event_seconds",
                                     "compute of each realtime stream event: partial = one hop, final = the "
                                     "utterance's final check", ["kind"], buckets=LATENCY_BUCKETS,
                                     registry=registry)
        self.tokens = Counter("megaedge_decoded_tokens", "tokens decoded (transcriptions: generated tokens; "
                              "realtime: the tokens of each final)", ["kind"], registry=registry)
        self.decode_seconds = Counter("megaedge_decode_seconds", "seconds spent in decode steps of transcriptions "
                                      "(rate(megaedge_decoded_tokens_total{kind='transcription'}) / rate(this) = "
                                      "tokens/s)", registry=registry)
        self.audio_seconds = Counter("megaedge_audio_seconds", "seconds of audio transcribed", ["kind"],
                                     registry=registry)
        self.requests = Counter("megaedge_requests", "requests and realtime sessions by outcome",
                                ["kind", "status"], registry=registry)
        self.catch_up_seconds = Counter("megaedge_realtime_catch_up_audio_seconds",
                                        "realtime audio decoded without partials because the server was behind its "
                                        "connection", registry=registry)
        self.errors = Counter("megaedge_errors", "errors sent to clients, by code", ["code"], registry=registry)
        self.batch_size = Histogram("megaedge_decode_batch_size",
                                    "decode steps of concurrent streams and requests run in one call (1: a step "
                                    "alone); only bundles whose decoder batches (native INT8, --target cuda)",
                                    buckets=BATCH_BUCKETS, registry=registry)
        for kind in ("realtime", "transcription"):
            self.active_streams.labels(kind).set(0)
            self.tokens.labels(kind)
            self.audio_seconds.labels(kind)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
