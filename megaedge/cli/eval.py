"""``megaedge eval``: WER/CER of a bundle on a labelled clip set, per scenario and condition."""

from __future__ import annotations

import argparse

from megaedge.cli.common import (
    add_decode_engine_option,
    add_digest_option,
    add_language_option,
    add_threads_option,
    add_vad_option,
)
from megaedge.runtime import limits
from megaedge.runtime.limits import arg_type

NAME = "eval"
HELP = ("measure WER/CER of a bundle on a JSONL clip set (per condition / scenario, empty and loop rates, routes) "
        "and what a confidence threshold would refuse")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("set", nargs="?", help="JSONL clip set (path + text per line; default: the fixture's "
                                               "held-out set)")
    parser.add_argument("--route", choices=("auto", "base", "lora"), default="auto", help="route (default auto)")
    add_language_option(parser)
    parser.add_argument("--limit", type=arg_type(limits.check_int, parse=int, option="limit", low=limits.EVAL_LIMIT[0],
                                                 high=limits.EVAL_LIMIT[1], fix="leave it out to evaluate every clip"),
                        help="evaluate only the first N clips (N >= 1; default: all)")
    parser.add_argument("--providers", default="cpu", help="comma list: cpu, cuda, tensorrt (default cpu)")
    add_decode_engine_option(parser)
    add_vad_option(parser)
    add_digest_option(parser)
    add_threads_option(parser)
    parser.add_argument("--json", dest="json_out", metavar="OUT",
                        help="also write the full report (groups + per-clip rows) to this file (its folder must exist)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from megaedge.errors import require

    require("jiwer", "eval")
    from megaedge import fixture
    from megaedge.runtime.evaluate import evaluate, format_table, read_set
    from megaedge.runtime.transcriber import Transcriber

    if args.json_out:  # checked before the run: a bad path must not cost a whole evaluation
        limits.check_output_file(args.json_out, "--json")
    if args.set:
        limits.check_list_input(args.set, "SET")
    items = read_set(args.set or fixture.heldout_manifest())[: args.limit]
    from megaedge.errors import AudioError
    from megaedge.runtime import audio as audio_io

    for number, item in enumerate(items, 1):  # a bad clip fails now, named, not after the clips before it
        try:
            audio_io.check_readable(item["path"])
        except AudioError as exc:
            raise AudioError(f"{args.set or 'the held-out set'}, clip {number}: {exc}") from None
    transcriber = Transcriber.from_bundle(args.bundle, providers=args.providers.split(","), route=args.route,
                                          threads=args.threads, decode=args.decode,
                                          prefill=args.prefill, stem=args.stem, kv_cache=args.kv_cache, vad=args.vad,
                                          expected_digest=args.expect_digest)

    def one(path):
        result = transcriber.transcribe(path, language=args.language)
        return result.text, result.loop_guard, result.route, result.min_logprob

    report = evaluate(one, items)
    report["bundle"] = {"mode": transcriber.manifest.mode, "precision": transcriber.manifest.precision,
                        "route": args.route}
    print(format_table(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0
