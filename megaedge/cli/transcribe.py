"""``megaedge transcribe``: offline transcription with the lean runtime (no torch)."""

from __future__ import annotations

import argparse

from megaedge.cli.common import (
    add_decode_engine_option,
    add_decoding_options,
    add_digest_option,
    add_threads_option,
    add_vad_option,
)

NAME = "transcribe"
HELP = "transcribe audio files with a bundle (lean runtime: numpy + onnxruntime + tokenizers)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `megaedge export`")
    parser.add_argument("files", nargs="+", help="audio files (anything soundfile reads, any rate, mono or stereo); "
                                                 "- reads one from standard input")
    parser.add_argument("--route", choices=("auto", "base", "lora"), default="auto",
                        help="routed bundles: auto = the router decides per segment (default); base / lora force one")
    add_decoding_options(parser)
    parser.add_argument("--format", choices=("text", "json", "srt", "vtt"),
                        help="text: a line per file (default); json: as --json; srt / vtt: subtitles of one file, "
                             "cues of two lines at most, timed within each segment by their share of its text")
    parser.add_argument("--providers", default="cpu", help="comma list: cpu, cuda, tensorrt (default cpu)")
    add_decode_engine_option(parser)
    add_vad_option(parser)
    add_digest_option(parser)
    add_threads_option(parser)
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from megaedge.cli.common import print_json_line
    from megaedge.errors import MegaedgeError
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime import output
    from megaedge.runtime.transcriber import Transcriber

    if args.files.count("-") > 1:
        raise MegaedgeError("standard input (-) holds one file: give - once")
    if args.json and args.format not in (None, "json"):
        raise MegaedgeError(f"--json and --format {args.format} ask for two outputs: give one of them")
    fmt = "json" if args.json else (args.format or "text")
    if fmt in output.SUBTITLE_FORMATS and len(args.files) > 1:
        loop = (f"for f in *.wav; do megaedge transcribe {shlex.quote(args.bundle)} \"$f\" --format {fmt} "
                f"> \"${{f%.*}}.{fmt}\"; done")
        raise MegaedgeError(f"--format {fmt} writes the subtitles of one file; give one file per run ({loop})")
    piped = piped_info = None
    for name in args.files:  # a bad file fails before the bundle is loaded
        if name == "-":  # a pipe cannot seek, which soundfile needs: read it whole, then as an upload is read
            piped = _read_stdin(sys.stdin.buffer)
            piped_info = audio_io.check_bytes(piped, "standard input")
        else:
            audio_io.check_readable(name)
    transcriber = Transcriber.from_bundle(args.bundle, providers=args.providers.split(","), route=args.route,
                                          verify=not args.no_verify, threads=args.threads, decode=args.decode,
                                          prefill=args.prefill, stem=args.stem, kv_cache=args.kv_cache, vad=args.vad,
                                          expected_digest=args.expect_digest)
    for name in args.files:
        audio = audio_io.read_bytes(piped, "standard input", info=piped_info) if name == "-" else name
        result = transcriber.transcribe(audio, language=args.language, context=args.context,
                                        max_text_tokens=args.max_new_tokens)
        if fmt in output.SUBTITLE_FORMATS:
            sys.stdout.write(output.subtitles(result.segments, fmt))
        elif fmt == "json":
            doc = result.to_dict()
            doc.pop("raw", None)
            print_json_line({"file": name, **doc})
        else:
            prob = f" p_degraded={result.degraded_prob:.2f}" if result.degraded_prob is not None else ""
            guard = " loop-guard" if result.loop_guard else ""
            conf = f" logp={result.min_logprob:.2f}" if result.min_logprob is not None else ""
            print(f"{name}\t[{result.language or '?'}; {result.route}{prob}{conf}{guard}]\t{result.text}")
    return 0


def _read_stdin(source) -> bytes:
    """All of standard input, refused in one line as soon as its start is not audio soundfile reads (``cat
    /dev/zero``) or it outgrows a quarter of the free memory (a capture left running), not when memory is gone."""
    from megaedge.errors import AudioError
    from megaedge.runtime import audio as audio_io

    parts, size, checked = [], 0, False
    while True:
        chunk = source.read(1 << 20)
        if chunk:
            parts.append(chunk)
            size += len(chunk)
        if not checked and (size >= 1 << 16 or not chunk):
            head = b"".join(parts)[: 1 << 16]
            if head:
                audio_io.check_bytes(head, "standard input", whole=False)
            checked = True
        if not chunk:
            return b"".join(parts)
        free = audio_io.available_bytes()
        if free is not None and 4 * size > free:
            raise AudioError(f"standard input: {size / 2**30:.1f} GiB read and more coming, over a quarter of the "
                             f"{free / 2**30:.1f} GiB free; write it to a file and transcribe it in parts (ffmpeg -i "
                             "IN -f segment -segment_time 600 part%03d.wav)")
