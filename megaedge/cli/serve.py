"""``megaedge serve``: an OpenAI-compatible transcription server (HTTP + realtime WebSocket) over one bundle."""

from __future__ import annotations

import argparse

from megaedge.cli.common import add_decode_engine_option, add_digest_option, add_threads_option, add_vad_option
from megaedge.runtime.limits import arg_type
from megaedge.serve import config as limits

NAME = "serve"
HELP = "serve a bundle over HTTP: OpenAI-style /v1/audio/transcriptions, realtime WebSocket, /health, /metrics"
DESCRIPTION = (HELP + ". Binds 127.0.0.1 unless --host says otherwise; the API key (--api-key or $MEGAEDGE_API_KEY) "
               "is off unless given. See docs/serving.md.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `megaedge export`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=arg_type(limits.port), default=8000, help="TCP port (default 8000; 0: a free one)")
    parser.add_argument("--max-streams", type=arg_type(limits.max_streams), default=4,
                        help="stream slots: realtime connections plus transcriptions decoding at once; also the "
                             "worker threads (default 4)")
    parser.add_argument("--max-queue", type=arg_type(limits.max_queue),
                        help="transcription requests that may wait for a slot; beyond, 429 (default: --max-streams). "
                             "Realtime connections do not queue: beyond the slots one waits up to 1 s, then gets an error "
                             "and close 1013")
    parser.add_argument("--api-key", help="require Authorization: Bearer KEY (WebSockets: the header or ?api_key=KEY); "
                                          "default $MEGAEDGE_API_KEY, else no key (keep the default host then)")
    parser.add_argument("--model-name", default="megaedge", help="the model id /v1/models lists (default megaedge)")
    parser.add_argument("--route", choices=("auto", "base", "lora"), default="auto",
                        help="routed bundles: auto = the router decides (default); base / lora force one")
    parser.add_argument("--preset", default="balanced",
                        help="stream preset of realtime sessions: balanced (default), interactive, dictation")
    parser.add_argument("--providers", default="cpu", help="comma list: cpu, cuda, tensorrt (default cpu)")
    add_decode_engine_option(parser)
    add_vad_option(parser)
    add_threads_option(parser, "per call; default: all cores. With several streams, cores / --max-streams "
                               "avoids oversubscribing")
    parser.add_argument("--max-request-mb", type=arg_type(limits.max_request_mb), default=25.0,
                        help="largest request body in MiB: 413 beyond (default 25, OpenAI's upload limit)")
    parser.add_argument("--max-audio-seconds", type=arg_type(limits.max_audio_seconds), default=600.0,
                        help="longest audio per transcription request: 400 beyond (default 600)")
    parser.add_argument("--idle-timeout", type=arg_type(limits.idle_timeout), default=60.0,
                        help="close a realtime connection after this many seconds without a client event "
                             "(default 60)")
    parser.add_argument("--shutdown-timeout", type=arg_type(limits.shutdown_timeout), default=30.0,
                        help="on SIGTERM / SIGHUP / Ctrl-C: seconds to finish open utterances and requests "
                             "(default 30); requests still open then get 503")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")
    add_digest_option(parser)


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from megaedge.errors import MegaedgeError, require

    for module in ("fastapi", "uvicorn", "multipart", "prometheus_client", "websockets"):
        require(module, "serve")
    from megaedge.runtime.streaming import PRESETS
    from megaedge.serve.config import ServeConfig
    from megaedge.serve.server import env_api_key, serve

    bundle = Path(args.bundle).expanduser()
    if not (bundle / "megaedge.json").is_file():
        raise MegaedgeError(f"{bundle}: not a bundle (no megaedge.json); export one with `megaedge export`")
    if args.preset not in PRESETS or args.preset == "exact":
        raise MegaedgeError(f"--preset {args.preset!r}: realtime sessions take balanced, interactive or dictation")
    config = ServeConfig(
        bundle=str(bundle), host=args.host, port=args.port, max_streams=args.max_streams, max_queue=args.max_queue,
        api_key=args.api_key or env_api_key(), providers=tuple(args.providers.split(",")), threads=args.threads,
        decode=args.decode, prefill=args.prefill, stem=args.stem, kv_cache=args.kv_cache, vad=args.vad,
        route=args.route, verify=not args.no_verify, max_request_mb=args.max_request_mb,
        max_audio_seconds=args.max_audio_seconds, idle_timeout=args.idle_timeout, preset=args.preset,
        model_name=args.model_name, shutdown_timeout=args.shutdown_timeout, expected_digest=args.expect_digest)
    log = logging.getLogger("megaedge.serve")
    verbose = logging.getLogger("megaedge").getEffectiveLevel() <= logging.INFO
    if not verbose:  # a server says where it listens and when the bundle is loaded; why a request failed is -v
        log.setLevel(logging.INFO)
        logging.getLogger("megaedge.serve.requests").setLevel(logging.WARNING)
    # one line per request (probes and scrapes included) is for -v: a service's log says what changed, not traffic
    # uvicorn's own start and stop lines are for -v: the server logs where it listens and when it shuts down
    return serve(config, log_level={0: "warning", 1: "info"}.get(args.verbose, "debug"), access_log=args.verbose >= 1)
