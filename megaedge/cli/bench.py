"""``megaedge bench``: per-stage latency of a bundle on this machine, decode vs the memory-bandwidth bound."""

from __future__ import annotations

import argparse

from megaedge.cli.common import add_decode_engine_option

NAME = "bench"
HELP = "measure a bundle on this machine: stages (median/p95), decode tok/s vs the bandwidth bound, RTF, memory"


def _seconds_list(text: str) -> tuple[float, ...]:
    from megaedge.errors import MegaedgeError

    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MegaedgeError(f"--audio {text!r}: expected seconds separated by commas, e.g. 10,30") from None
    if not values or any(v <= 0 or v > 3600 for v in values):
        raise MegaedgeError(f"--audio {text!r}: each length must be in (0, 3600] seconds, e.g. 10,30")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `megaedge export`")
    parser.add_argument("--audio", default="10,30", help="audio lengths in seconds, comma separated (default 10,30)")
    parser.add_argument("--repeat", type=int, default=3, help="measured runs per length (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    parser.add_argument("--tokens", type=int, default=32,
                        help="generate exactly this many tokens, ignoring EOS, so runs compare (0: stop at EOS)")
    parser.add_argument("--route", choices=("auto", "base", "lora"), default="auto")
    parser.add_argument("--providers", default="cpu", help="comma list: cpu, cuda, tensorrt (default cpu)")
    add_decode_engine_option(parser)
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--json", dest="json_out", metavar="OUT", help="write the full report as JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="stacked stage bar chart (needs matplotlib)")
    parser.add_argument("--profile", metavar="DIR",
                        help="after the timed runs, one run per length with onnxruntime's per-node profiler: traces "
                             "(chrome://tracing / Perfetto) in DIR, per-graph operator and provider summary printed")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from megaedge.errors import MegaedgeError
    from megaedge.progress import track
    from megaedge.runtime import bench

    if args.repeat < 1 or args.warmup < 0 or args.tokens < 0:
        raise MegaedgeError(f"--repeat {args.repeat} / --warmup {args.warmup} / --tokens {args.tokens}: need "
                            "repeat >= 1, warmup >= 0, tokens >= 0")
    lengths = _seconds_list(args.audio)
    options = bench.BenchOptions(audio_seconds=lengths, repeat=args.repeat, warmup=args.warmup,
                                 new_tokens=args.tokens or None, route=args.route, threads=args.threads,
                                 providers=tuple(args.providers.split(",")), profile_dir=args.profile,
                                 decode=args.decode, prefill=args.prefill, stem=args.stem)
    bar = track(range(len(lengths) * (args.repeat + args.warmup)), desc="bench", unit="run")
    steps = iter(bar)
    report = bench.run(args.bundle, options, progress=lambda seconds, i: next(steps, None))
    print(bench.format_table(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        try:
            bench.plot(report, Path(args.plot))
        except ImportError:
            raise MegaedgeError("--plot needs matplotlib: pip install 'megaedge[calib]'") from None
    return 0
