"""``megaedge bench``: per-stage latency of a bundle on this machine, decode vs the memory-bandwidth bound."""

from __future__ import annotations

import argparse

from megaedge.cli.common import add_decode_engine_option, add_threads_option
from megaedge.runtime import limits
from megaedge.runtime.limits import arg_type

NAME = "bench"
HELP = "measure a bundle on this machine: stages (median/p95), decode tok/s vs the bandwidth bound, RTF, memory"


def _seconds_list(text: str) -> tuple[float, ...]:
    """'10,30' -> (10.0, 30.0); each length finite and in limits.BENCH_AUDIO_SECONDS (nan and inf refused)."""
    import argparse

    parts = text.split(",")
    if not text.strip() or any(not v.strip() for v in parts):
        raise argparse.ArgumentTypeError(f"{limits.show(text)}: expected seconds separated by commas, e.g. 10,30")
    try:
        return tuple(limits.check_audio_seconds(v) for v in parts)
    except limits.LimitError as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None


def _int_option(option: str, bounds: tuple[int, int], fix: str = ""):
    return arg_type(limits.check_int, parse=int, option=option, low=bounds[0], high=bounds[1], fix=fix)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `megaedge export`")
    high = limits.BENCH_AUDIO_SECONDS[1]
    parser.add_argument("--audio", default="10,30", type=_seconds_list,
                        help=f"audio lengths in seconds, comma separated, each in (0, {high:g}] (default 10,30)")
    parser.add_argument("--repeat", type=_int_option("repeat", limits.BENCH_REPEAT), default=3,
                        help=f"measured runs per length, {limits.BENCH_REPEAT[0]}-{limits.BENCH_REPEAT[1]} (default 3)")
    parser.add_argument("--warmup", type=_int_option("warmup", limits.BENCH_WARMUP), default=1,
                        help=f"unmeasured runs first, {limits.BENCH_WARMUP[0]}-{limits.BENCH_WARMUP[1]} (default 1)")
    parser.add_argument("--tokens", type=_int_option("tokens", (0, limits.MAX_NEW_TOKENS), "0 stops at EOS"),
                        default=32, help="generate exactly this many tokens, ignoring EOS, so runs compare, "
                                         f"0-{limits.MAX_NEW_TOKENS} (0: stop at EOS; default 32)")
    parser.add_argument("--route", choices=("auto", "base", "lora"), default="auto")
    parser.add_argument("--providers", default="cpu", help="comma list: cpu, cuda, tensorrt (default cpu)")
    add_decode_engine_option(parser)
    add_threads_option(parser)
    parser.add_argument("--json", dest="json_out", metavar="OUT",
                        help="write the full report as JSON to this file (its folder must exist)")
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

    # Output paths are checked before the run: a typo must not cost minutes of benchmarking.
    if args.json_out:
        limits.check_output_file(args.json_out, "--json")
    if args.plot:
        limits.check_output_file(args.plot, "--plot")
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise MegaedgeError("--plot needs matplotlib: pip install 'megaedge[calib]'")
    if args.profile:
        limits.check_output_dir(args.profile, "--profile")
    lengths = args.audio
    options = bench.BenchOptions(audio_seconds=lengths, repeat=args.repeat, warmup=args.warmup,
                                 new_tokens=args.tokens or None, route=args.route, threads=args.threads,
                                 providers=tuple(args.providers.split(",")), profile_dir=args.profile,
                                 decode=args.decode, prefill=args.prefill, stem=args.stem, kv_cache=args.kv_cache)
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
