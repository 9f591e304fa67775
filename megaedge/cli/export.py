"""``megaedge export``: checkpoint -> self-describing bundle (ONNX encoder, decoder with KV cache, router)."""

from __future__ import annotations

import argparse

from megaedge.runtime import limits
from megaedge.runtime.limits import arg_type

NAME = "export"
MAX_KV = (64, 32768)  # megaedge.runtime.fixed_kv.MAX_KV_RANGE (tests/export/test_fixed_kv.py keeps them equal)
REPORT_CLIPS = (1, 100_000)  # megaedge.export.int8.REPORT_CLIPS (tests/export/test_int8_report.py keeps them equal)
# The recipe names of megaedge.export.quantize.RECIPES, spelled out so --help needs no import of the exporter
# (tests/cli/test_cli.py keeps the two in step).
RECIPE_NAMES = ("cpu", "cpu-prefill", "cpu-int4", "cpu-int8-fc2", "cpu-accurate", "cpu-float-encoder", "cpu-fast",
                "cpu-dynamic", "smoothquant", "cpu-weights", "tensorrt", "naive")
HELP = "export a checkpoint to a bundle (ONNX graphs + tokenizer + megaedge.json) the lean runtime runs"
DESCRIPTION = (
    "Loads any supported checkpoint layout, folds the LoRA exactly (--mode merged) or keeps it as a gated branch "
    "(--mode routed: one copy of the base weights serves both routes), exports the encoder, the decoder with KV "
    "cache and the router to ONNX, validates the bundle against the torch model and writes megaedge.json. "
    "Without MODEL it exports megaedge's shipped trained fixture."
)


def _precision(value: str) -> str:
    if value == "int8":
        raise argparse.ArgumentTypeError("int8 is not a float precision; add --int8 (INT8 quantized from the FP32 "
                                         "graphs, with --recipe)")
    if value not in ("fp32", "fp16"):
        raise argparse.ArgumentTypeError(f"{value!r} is not fp32 or fp16")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="checkpoint directory (default: the shipped trained fixture)")
    parser.add_argument("--out", default="bundle", help="bundle directory to create (default ./bundle)")
    parser.add_argument("--precision", type=_precision, default="fp32", metavar="{fp32,fp16}",
                        help="float precision of the graphs (fp16 for GPUs; default fp32; INT8: --int8)")
    parser.add_argument("--mode", choices=("merged", "routed"), default="merged",
                        help="merged: LoRA folded in; routed: LoRA as a gated branch chosen per input (default merged)")
    parser.add_argument("--adapter", help="LoRA adapter directory (default: the checkpoint's mega-asr-merged/)")
    parser.add_argument("--router", help="router safetensors (default: the checkpoint's audio_quality_router/)")
    parser.add_argument("--no-router", action="store_true", help="leave the router out of the bundle")
    parser.add_argument("--opset", type=arg_type(limits.check_int, parse=int, option="opset", low=limits.OPSET[0],
                                                 high=limits.OPSET[1]),
                        default=18, help=f"ONNX opset, {limits.OPSET[0]}-{limits.OPSET[1]} (default 18)")
    parser.add_argument("--no-validate", action="store_true", help="skip the bundle-vs-torch check after export")
    parser.add_argument("--validate-rtol", type=float, default=None,
                        help="validation tolerance relative to the torch outputs' scale, 1e-6..1e-1 (default 1e-3 "
                             "for fp32, 2e-2 for fp16); top-1 and greedy tokens must agree too")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing bundle at --out (never a folder that is not a megaedge bundle or "
                             "holds other files too, the working directory or one holding the inputs)")
    int8 = parser.add_argument_group("INT8 (calibrated on wild audio)")
    int8.add_argument("--int8", action="store_true", help="write an INT8 bundle and its per-condition accuracy report")
    int8.add_argument("--target", choices=("cpu", "cuda", "tensorrt"), default=None,
                      help="device the bundle is made for (default cpu); without --int8, cuda writes the fixed-KV "
                           "decoder (in-place KV buffers, CUDA graphs; run it with --precision fp16); with --int8, "
                           "the device the INT8 flavour is made for")
    int8.add_argument("--recipe", help=f"INT8 recipe: {', '.join(RECIPE_NAMES)} (default: the target's)")
    int8.add_argument("--calib", help="calibration clips: a folder or a JSONL manifest (default: the shipped "
                                      "wild-audio calibration clips)")
    int8.add_argument("--calib-cache", help="folder that keeps activation ranges so re-runs skip calibration")
    int8.add_argument("--eval-set", help="labelled JSONL set for the report (default: the fixture's held-out clips)")
    int8.add_argument("--no-report", action="store_true", help="skip the accuracy report")
    int8.add_argument("--report-clips", type=arg_type(limits.check_int, parse=int, option="report-clips",
                                                      low=REPORT_CLIPS[0], high=REPORT_CLIPS[1]),
                      help=f"report on at most N clips of the set, spread over its groups, {REPORT_CLIPS[0]}-"
                           f"{REPORT_CLIPS[1]} (default all; the report transcribes each clip once per variant)")
    int8.add_argument("--no-compare", action="store_true",
                      help="report FP32 vs INT8 only, without quantizing and transcribing the naive and "
                           "clean-calibrated comparison variants (half the report's cost)")
    gpu = parser.add_argument_group("GPU (--target cuda, docs/device.md)")
    gpu.add_argument("--weights", choices=("int4", "int8"),
                     help="decoder weights as weight-only MatMulNBits blocks (int4: blocks of 32, int8: of 128; "
                          "float activations); default float")
    gpu.add_argument("--max-kv-length", type=arg_type(limits.check_int, parse=int, option="max-kv-length",
                                                      low=MAX_KV[0], high=MAX_KV[1]),
                     default=2048, help=f"positions of each stream's fixed KV buffer, {MAX_KV[0]}-{MAX_KV[1]} "
                                        f"(default 2048: a 30 s segment, its context and 256 new tokens fit)")


def run(args: argparse.Namespace) -> int:
    import sys

    from megaedge.cli.signals import Terminated, stop_like_ctrl_c

    # systemd / docker stop send SIGTERM: the export's cleanup must run for it as for Ctrl-C (a 1.7B staging
    # folder is ~10 GB).
    with stop_like_ctrl_c():
        try:
            return _run(args)
        except Terminated as stop:
            print(f"megaedge {NAME}: stopped by {stop.name}; nothing partial was left behind",
                  file=sys.stderr)
            return stop.exit_status


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def _int8_options_need_int8(args: argparse.Namespace) -> None:
    """An INT8 option without --int8 would be ignored and the bundle would not be what was asked for; and the
    INT8 TensorRT recipe names its target."""
    from megaedge.errors import MegaedgeError

    if args.int8:
        if args.recipe == "tensorrt" and args.target is None:
            raise MegaedgeError("--recipe tensorrt is the TensorRT flavour: add --target tensorrt (or cuda); a "
                                "bundle marked target cpu is refused by build-engines")
        args.target = args.target or "cpu"
        return
    given = [f"--{name.replace('_', '-')}" for name in ("recipe", "calib", "calib_cache", "eval_set", "report_clips")
             if getattr(args, name) is not None]
    given += [f"--{name.replace('_', '-')}" for name in ("no_report", "no_compare") if getattr(args, name)]
    if given:
        raise MegaedgeError(f"{given[0]} is an INT8 option: add --int8 (an fp32 / fp16 export takes none of them)")
    if args.target == "tensorrt":
        raise MegaedgeError("--target tensorrt builds on the INT8 bundle: add --int8 (or --target cuda for a float "
                            "GPU bundle)")


def _run(args: argparse.Namespace) -> int:
    from megaedge.cli.common import need_export_extra, print_json

    need_export_extra()
    limits.check_output_dir(args.out, "--out")  # a read-only folder fails now, not after the export
    from megaedge import fixture
    from megaedge.export.bundle import ExportOptions, export_bundle
    from megaedge.runtime import manifest

    options = ExportOptions(precision=args.precision, mode=args.mode, opset=args.opset,
                            validate=not args.no_validate, force=args.force, include_router=not args.no_router,
                            validate_rtol=args.validate_rtol, max_kv_length=args.max_kv_length, weights=args.weights,
                            target="cuda" if args.target == "cuda" and not args.int8 else "cpu")
    model = args.model or fixture.model_dir()
    _int8_options_need_int8(args)
    if args.int8:
        from megaedge.errors import MegaedgeError
        from megaedge.export.int8 import Int8Options, export_int8, format_report

        if args.precision != "fp32":
            raise MegaedgeError(f"--int8 with --precision {args.precision}: INT8 is built from fp32; drop --precision")
        if args.weights:
            raise MegaedgeError(f"--int8 with --weights {args.weights}: choose one (--weights is for --target cuda)")
        int8 = Int8Options(target=args.target, recipe=args.recipe, calib=args.calib, calib_cache=args.calib_cache,
                           eval_set=args.eval_set, report=not args.no_report, compare=not args.no_compare,
                           report_clips=args.report_clips)
        int8.chosen_recipe()  # an unknown recipe fails before the export
        if args.calib:  # so do a .wav given where a list or folder belongs, and a missing set
            limits.check_list_input(args.calib, "--calib", suffixes=(".jsonl", ".json"), folder_ok=True)
        if args.eval_set:
            limits.check_list_input(args.eval_set, "--eval-set")
        if args.calib_cache:
            limits.check_output_dir(args.calib_cache, "--calib-cache")
        out = export_int8(model, args.out, options, int8, say=_stderr, adapter=args.adapter, router=args.router)
        report = out / manifest.QUANT_REPORT_JSON
        if report.is_file():
            import json

            print(format_report(json.loads(report.read_text())))
    else:
        out = export_bundle(model, args.out, options, adapter=args.adapter, router=args.router)
    info = manifest.read(out, verify=False)
    size = sum((out / f).stat().st_size for f in info.files)
    validation = next((note for note in info.notes if note.startswith("validation")), None)
    print_json({"bundle": str(out), "mode": info.mode, "precision": info.precision,
                "graphs": sorted(info.graphs), "size_mb": round(size / 1e6, 2), "validation": validation})
    return 0
