"""``megaedge stream``: live transcription from a microphone or a file, partial results every hop."""

from __future__ import annotations

import argparse

from megaedge.cli.common import (
    add_context_option,
    add_decode_engine_option,
    add_digest_option,
    add_language_option,
    add_threads_option,
    add_vad_option,
)
from megaedge.runtime import limits
from megaedge.runtime.limits import arg_type

NAME = "stream"
HELP = "stream from a microphone (--mic) or a file (--file): partials update in place, finals on new lines"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `megaedge export`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mic", action="store_true", help="record from a microphone (extra: mic)")
    source.add_argument("--file", help="stream an audio file (anything soundfile reads); - reads standard input as "
                                       "it comes: a WAV stream (arecord -t wav, ffmpeg -f wav -), or raw PCM with --raw")
    parser.add_argument("--raw", type=int, metavar="RATE",
                        help="--file -: standard input is raw 16-bit little-endian mono PCM at RATE Hz (arecord -t raw "
                             "-f S16_LE -c 1, ffmpeg -f s16le -ac 1 -)")
    parser.add_argument("--device", help="microphone: sounddevice device index or name (default: system default)")
    parser.add_argument("--seconds", type=arg_type(limits.check_stream_seconds, parse=float),
                        help=f"stop after this much audio, 0-{limits.STREAM_SECONDS[1]:g} s (exclusive 0), then "
                             "flush (default: until Ctrl-C or the end of the file)")
    parser.add_argument("--realtime", action="store_true", help="--file: feed at real-time speed, as a mic would")
    parser.add_argument("--preset", default="balanced",
                        help="balanced (default), interactive, dictation or exact (no endpointing; finals are "
                             "offline transcription, segment by segment)")
    parser.add_argument("--hop", type=arg_type(limits.check_hop, parse=float),
                        help=f"seconds between partial results, {limits.HOP_SECONDS[0]:g}-{limits.HOP_SECONDS[1]:g} "
                             "(overrides the preset)")
    parser.add_argument("--no-endpoint", action="store_true", help="never finalise on silence")
    parser.add_argument("--route", choices=("auto", "base", "lora"), default="auto")
    add_language_option(parser)
    add_context_option(parser)
    parser.add_argument("--json", action="store_true", help="one JSON event per line (partials and finals)")
    parser.add_argument("--providers", default="cpu", help="comma list: cpu, cuda, tensorrt (default cpu)")
    add_decode_engine_option(parser)
    add_vad_option(parser)
    add_digest_option(parser)
    add_threads_option(parser)


class _Printer:
    """Partials rewrite one terminal line; finals end it. --json prints every event as one line."""

    def __init__(self, as_json: bool):
        import sys

        self.json, self.out = as_json, sys.stdout
        self.tty = self.out.isatty()
        self.width = 0

    def __call__(self, event) -> None:
        import json
        from dataclasses import asdict

        if self.json:
            doc = asdict(event)
            doc["token_ids"] = list(doc["token_ids"])
            self.out.write(json.dumps(doc, ensure_ascii=False) + "\n")
        elif event.kind == "final":
            if event.text or self.width:
                self._line(f"[{event.start:7.2f}-{event.end:7.2f}] {event.text}", end=True)
        elif self.tty:
            self._line(f"... {event.text}", end=False)
        self.out.flush()

    def _line(self, text: str, end: bool) -> None:
        pad = " " * max(0, self.width - len(text))
        self.out.write(("\r" if self.tty else "") + text + pad + ("\n" if end else ""))
        self.width = 0 if end else len(text)


def _options(args):
    from dataclasses import replace

    from megaedge.runtime.streaming import StreamOptions

    options = StreamOptions.preset(args.preset)
    changes = {"route": args.route, "language": args.language, "context": args.context}
    if args.hop:
        changes["hop_seconds"] = args.hop
    if args.no_endpoint:
        changes["endpointing"] = False
    return replace(options, **changes)


def _file_chunks(args, hop: float):
    import time

    from megaedge.runtime import audio as audio_io

    audio_io.check_readable(args.file)
    samples = audio_io.load(args.file)
    if args.seconds:
        samples = samples[: int(args.seconds * audio_io.TARGET_RATE)]
    step = max(1, int(hop * audio_io.TARGET_RATE))
    start = time.perf_counter()
    for i in range(0, len(samples), step):
        if args.realtime:
            time.sleep(max(0.0, start + i / audio_io.TARGET_RATE - time.perf_counter()))
        yield samples[i : i + step], audio_io.TARGET_RATE


def _stdin_chunks(args, hop: float):
    """Standard input as a live source, fed as its producer writes it (runtime/pipe.py): a WAV stream, or raw
    16-bit mono PCM at ``--raw`` Hz."""
    import sys

    import numpy as np

    from megaedge.errors import AudioError, MegaedgeError
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime import pipe

    source = sys.stdin.buffer
    if args.raw:
        fmt, data_bytes = pipe.PcmFormat(args.raw, 1, 2), None
    else:
        try:
            fmt, data_bytes = pipe.read_wav_header(source, "--file -: standard input")
        except AudioError as exc:
            hint = ("; for raw PCM pass --raw RATE (16-bit little-endian mono, e.g. arecord -t raw -f S16_LE -c 1 "
                    "-r 16000)") if "is not a WAV stream" in str(exc) else ""
            raise MegaedgeError(f"{exc}{hint}") from None
    audio_io.check_rate(fmt.rate, "--file -: the WAV stream's sample rate")
    total, limit = 0, int(args.seconds * fmt.rate) if args.seconds else None
    step = max(1, int(hop * fmt.rate))  # a hop a block, as from a microphone or a file
    for block in pipe.blocks(source, fmt, step, data_bytes, align=step):
        if limit is not None:
            block = block[: limit - total]
        total += len(block)
        if block.dtype.kind == "i" and block.dtype.itemsize == 4:
            # 24/32-bit PCM is what the WAV header says: floats, so that no block is judged a scale mistake
            block = block.astype(np.float32) / np.float32(2**31)
        yield (block[:, 0] if fmt.channels == 1 else block), fmt.rate
        if limit is not None and total >= limit:
            return


def _sounddevice():
    """sounddevice, or one line naming the fix: without PortAudio its import raises OSError, not ImportError."""
    from megaedge.errors import MegaedgeError, require

    try:
        return require("sounddevice", "mic")
    except OSError as exc:
        raise MegaedgeError(f"--mic: the PortAudio library is missing ({exc}); install it: "
                            "apt-get install libportaudio2 (macOS: brew install portaudio)") from None


def _mic_chunks(args, hop: float):
    import queue

    import numpy as np

    from megaedge.errors import MegaedgeError

    sd = _sounddevice()
    device = int(args.device) if args.device and args.device.isdigit() else args.device
    try:
        rate = int(sd.query_devices(device, "input")["default_samplerate"])
    except Exception as exc:  # sounddevice raises ValueError / PortAudioError for unknown devices
        raise MegaedgeError(f"--device {args.device!r}: no such input device ({exc}); list them with "
                            "python -m sounddevice") from exc
    # Prefer 16 kHz when the device takes it (no resampling); otherwise the stream resamples.
    try:
        sd.check_input_settings(device=device, samplerate=16000, channels=1, dtype="int16")
        rate = 16000
    except Exception:
        pass
    blocks: queue.Queue = queue.Queue()

    def callback(data, frames, when, status):  # PortAudio thread: hand over a copy, nothing else
        blocks.put(data[:, 0].astype(np.float32) / 32768.0)

    total, limit = 0, int(args.seconds * rate) if args.seconds else None
    # 16-bit capture: what microphones deliver, and the one format every ALSA device (the file plugin included)
    # hands over unconverted.
    with sd.InputStream(samplerate=rate, channels=1, dtype="int16", device=device,
                        blocksize=max(1, int(hop * rate)), callback=callback):
        while limit is None or total < limit:
            block = blocks.get()
            if limit is not None:
                block = block[: limit - total]
            total += block.size
            yield block, rate


def run(args: argparse.Namespace) -> int:
    import sys

    from megaedge.cli.signals import Terminated, stop_like_ctrl_c

    # systemd and docker stop a service with SIGTERM, a closed terminal sends SIGHUP: both end the stream as Ctrl-C
    # does, with what was heard so far flushed as a final event (they used to kill it with nothing flushed).
    with stop_like_ctrl_c() as guard:
        try:
            return _run(args, guard)
        except Terminated as stop:  # before the stream started: nothing was heard, nothing to flush
            print(f"megaedge {NAME}: stopped by {stop.name} before streaming began", file=sys.stderr)
            return stop.exit_status


def _run(args: argparse.Namespace, guard) -> int:
    from megaedge.errors import MegaedgeError
    from megaedge.runtime.transcriber import Transcriber

    options = _options(args)
    stdin = args.file == "-"
    if args.raw is not None:
        from megaedge.runtime import audio as audio_io

        if not stdin:
            raise MegaedgeError("--raw describes standard input's PCM: use it with --file -")
        audio_io.check_rate(args.raw, "--raw")
    if stdin and args.realtime:
        raise MegaedgeError("--realtime paces a file; standard input comes at its producer's pace: leave it out")
    chunks = (_mic_chunks if args.mic else _stdin_chunks if stdin else _file_chunks)(args, options.hop_seconds)
    transcriber = Transcriber.from_bundle(args.bundle, providers=args.providers.split(","), route=args.route,
                                          threads=args.threads, decode=args.decode,
                                          prefill=args.prefill, stem=args.stem, kv_cache=args.kv_cache, vad=args.vad,
                                          expected_digest=args.expect_digest)
    stream = transcriber.create_stream(options)
    show = _Printer(args.json)
    try:
        for samples, rate in chunks:  # SIGTERM here (waiting for audio) stops at once
            with guard.deferred():  # ... and during a chunk's decoding, once the chunk is done
                for event in stream.accept_waveform(samples, rate):
                    show(event)
    except KeyboardInterrupt:
        pass  # Ctrl-C, SIGTERM, SIGHUP: what was heard so far is flushed below, and the exit status stays 0
    guard.hold()  # a second SIGTERM must not cut the final flush short
    for event in stream.finish():
        show(event)
    return 0
