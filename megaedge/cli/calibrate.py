"""``megaedge calibrate``: build a wild-audio calibration / evaluation set from clean speech."""

from __future__ import annotations

import argparse

from megaedge.runtime import limits
from megaedge.runtime.limits import arg_type

NAME = "calibrate"
HELP = "simulate wild audio (7 conditions, 54 scenarios) from clean speech: wav files + JSONL manifest"


def _severity(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"severity range {limits.show(text)} must look like LO:HI, e.g. 0.3:0.9") \
            from exc
    if not 0.0 <= lo <= hi <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"severity range {limits.show(text)} must satisfy 0 <= LO <= HI <= 1, "
                                         "e.g. 0.3:0.9")
    return lo, hi


def _count(option: str):
    low, high = limits.CALIB_COUNT
    return arg_type(limits.check_int, parse=int, option=option, low=low, high=high)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--speech", help="folder of clean speech (sidecar .txt = text) or a JSONL list; --preset eval "
                                         "without it uses the fixture's held-out sentences and voices (espeak-ng, "
                                         "else the shipped held-out clean clips)")
    parser.add_argument("--out", help="output folder (clips/, manifest.jsonl, set.json); default: a cache folder "
                                      "under $MEGAEDGE_CACHE/sets (~/.cache/megaedge/sets) named by the set's key. "
                                      "The same options, speech and code reuse a set already there")
    parser.add_argument("--preset", choices=("calibration", "eval", "smoke"), default="calibration",
                        help="counts and scenario set (default calibration: 8 per condition, all 54 scenarios once; "
                             "eval: 150 per condition and 150 clean, severities 0.3/0.5/0.7/0.9, every scenario once)")
    counts = f"{limits.CALIB_COUNT[0]}-{limits.CALIB_COUNT[1]}"
    parser.add_argument("--per-condition", type=_count("per-condition"), help=f"clips per atomic condition, {counts}")
    parser.add_argument("--per-scenario", type=_count("per-scenario"), help=f"clips per scenario, {counts}")
    parser.add_argument("--clean", type=_count("clean"), help=f"clean copies to include, {counts}")
    parser.add_argument("--scenarios", nargs="*", help="scenario names ('all' for every one, none for no scenarios)")
    parser.add_argument("--severity", type=_severity, help="severity range LO:HI within 0:1")
    parser.add_argument("--seed", type=arg_type(limits.check_int, parse=int, option="seed", low=limits.SEED[0],
                                                high=limits.SEED[1]),
                        help=f"random seed, {limits.SEED[0]}-{limits.SEED[1]} (same seed -> identical files)")
    parser.add_argument("--preview", metavar="PNG", help="also write spectrograms of one clip under each condition")
    parser.add_argument("--list-scenarios", action="store_true", help="print the scenario names and exit")
    parser.add_argument("--force", action="store_true",
                        help="replace the clips/ and manifest.jsonl of an existing set in --out (nothing else there "
                             "is touched)")


def run(args: argparse.Namespace) -> int:
    import sys

    from megaedge.cli.signals import Terminated, stop_like_ctrl_c

    # SIGTERM / SIGHUP run the same cleanup as Ctrl-C: the unfinished set is removed and --out stays as it was.
    with stop_like_ctrl_c():
        try:
            return _run(args)
        except Terminated as stop:
            print(f"megaedge {NAME}: stopped by {stop.name}; --out was left as it was", file=sys.stderr)
            return stop.exit_status


def _run(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from megaedge.errors import require

    require("scipy", "calib")
    require("pyroomacoustics", "calib")
    from megaedge.calibration import builder, scenarios

    if args.list_scenarios:
        for name, scenario in sorted(scenarios.SCENARIOS.items()):
            print(f"{name}\t{' -> '.join(scenario.steps)}\t{scenario.description}")
        return 0
    # Inputs and outputs are checked before any clip is simulated: a .wav given as the list, or a read-only
    # folder, fails with one line instead of a parser traceback or an error after minutes of work.
    from megaedge.errors import MegaedgeError

    if args.speech is None and (args.preset != "eval" or args.preview):
        raise MegaedgeError("--speech is required (only --preset eval has a default: the fixture's held-out speech)")
    if args.speech is not None:
        limits.check_list_input(args.speech, "--speech", suffixes=(".jsonl", ".json"), folder_ok=True)
    if args.out is not None:
        limits.check_output_dir(args.out, "--out")
    if args.preview:
        limits.check_output_file(args.preview, "--preview")
    options = builder.BuildOptions.preset(args.preset)
    changes = {k: v for k, v in {"per_condition": args.per_condition, "per_scenario": args.per_scenario,
                                 "clean": args.clean, "severity": args.severity, "seed": args.seed}.items()
               if v is not None}
    if args.scenarios is not None:
        changes["scenarios"] = tuple(scenarios.SCENARIOS) if args.scenarios == ["all"] else tuple(args.scenarios)
    options = dataclasses.replace(options, **changes).validated()
    if args.speech is None:
        from megaedge.calibration import heldout

        speech = heldout.heldout_speech(options.seed, builder.SAMPLE_RATE)
    else:
        speech = builder.speech_set(args.speech)
    key = builder.set_key(speech, options)
    out = args.out
    if out is None:
        out = builder.default_out(key)
        out.parent.mkdir(parents=True, exist_ok=True)
    reused = builder.reusable(out, key)
    if not reused:
        builder.check_out(out, speech, force=args.force)  # refused before "simulating N clips" is said
        jobs = len(builder.plan(options))
        print(f"simulating {jobs} clips from {speech.description}", file=sys.stderr)
    manifest = builder.build(speech, out, options, force=args.force)
    count = sum(1 for _ in manifest.open(encoding="utf-8"))
    print(f"{'reused' if reused else 'wrote'} {count} clips and {manifest}")
    if args.preview:
        require("matplotlib", "calib")
        print(f"preview: {builder.preview(args.speech, args.preview, seed=options.seed)}")
    return 0
