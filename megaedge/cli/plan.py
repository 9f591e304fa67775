"""``megaedge plan``: will a bundle fit a memory budget (Jetson, 8 GB GPU), and how long an input fits."""

from __future__ import annotations

import argparse

from megaedge.cli.common import add_engine_size_options
from megaedge.runtime import limits
from megaedge.runtime.limits import arg_type

NAME = "plan"
HELP = ("memory plan vs a budget (e.g. --memory 8GB): TensorRT engines, or a --target cuda bundle's weights + fixed "
        "KV buffers + activations on onnxruntime's CUDA provider")
DEVICE_NAMES = ("orin-nano-4gb", "orin-nano-8gb", "orin-nx-8gb", "orin-nx-16gb", "orin-agx-32gb", "orin-agx-64gb",
                "gpu-8gb")  # megaedge.runtime.gpu_plan.DEVICES (tests/runtime/test_gpu_plan.py keeps them equal)
STREAMS = (1, 64)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `megaedge export`")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--memory", help="memory the process may use, e.g. 6GB, 7500MB (what is left after the OS; "
                                         "default 8GB)")
    target.add_argument("--device", help=f"a known board: {', '.join(DEVICE_NAMES)} (usable memory assumed as "
                                         f"docs/device.md states; TensorRT plans know orin-nano-8gb, orin-nx-16gb, "
                                         f"gpu-8gb)")
    parser.add_argument("--precision", choices=("fp16", "int8"), help="engine precision (default: int8 for an int8 "
                                                                      "bundle, else fp16)")
    add_engine_size_options(parser)
    parser.add_argument("--streams", type=arg_type(limits.check_int, parse=int, option="streams", low=STREAMS[0],
                                                   high=STREAMS[1]),
                        default=1, help=f"fixed-KV bundles: concurrent calls or streams, each with its own KV "
                                        f"buffers, {STREAMS[0]}-{STREAMS[1]} (default 1)")
    parser.add_argument("--batch-steps", type=arg_type(limits.check_int, parse=int, option="batch-steps", low=1,
                                                       high=16),
                        default=8, help="fixed-KV bundles: the runtime's batch_steps (1-16, default 8); a decoder "
                                        "graph with a batch axis allocates KV buffers this many streams at a time")
    parser.add_argument("--json", action="store_true")


def parse_memory(text: str) -> float:
    """'8GB' / '7.5 GiB' / '7500MB' -> GiB."""
    from megaedge.errors import MegaedgeError

    raw = text.strip().upper().replace(" ", "").replace("IB", "B")
    low, high = limits.PLAN_MEMORY_GIB
    for suffix, scale in (("GB", 1.0), ("MB", 1 / 1024), ("G", 1.0), ("M", 1 / 1024)):
        if raw.endswith(suffix):
            try:
                value = float(raw[: -len(suffix)]) * scale
            except ValueError:
                break
            if low < value <= high:  # also refuses nan and inf
                return value
            raise MegaedgeError(f"--memory {limits.show(text)}: must be more than 0 and at most {high:g} GB")
    raise MegaedgeError(f"--memory {limits.show(text)}: expected a size like 8GB or 7500MB")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from dataclasses import replace
    from pathlib import Path

    from megaedge.errors import MegaedgeError
    from megaedge.runtime import manifest
    from megaedge.runtime import tensorrt as trt_plan

    bundle = Path(args.bundle)
    info = manifest.read(bundle, verify=False)
    if info.decoder.get("kv_cache") == "fixed":
        if args.precision:
            raise MegaedgeError(f"--precision {args.precision} is for TensorRT engine plans; a --target cuda bundle "
                                "runs as exported (leave --precision out)")
        return _fixed_kv_plan(args, bundle, info)
    if args.streams != 1 or args.batch_steps != 8:
        raise MegaedgeError(f"--{'streams' if args.streams != 1 else 'batch-steps'} is for --target cuda bundles "
                            "(fixed KV buffers); this one plans TensorRT engines, one stream each")
    if args.device:
        if args.device not in trt_plan.DEVICES:
            raise MegaedgeError(f"--device {args.device!r} is not one of {sorted(trt_plan.DEVICES)}; or pass --memory")
        memory = trt_plan.DEVICES[args.device]["usable_gib"]
    else:
        memory = parse_memory(args.memory or "8GB")
    precision = args.precision or ("int8" if info.precision == "int8" else "fp16")
    options = replace(trt_plan.EngineOptions(), precision=precision, max_audio_seconds=args.max_audio_seconds,
                      max_new_tokens=args.max_new_tokens, workspace_mib=args.workspace)
    result = trt_plan.plan(bundle, memory, options, info)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    if trt_plan.int8_not_for_engines(info):
        # the plan still answers "would engines of this size fit", but these graphs cannot become them
        print(f"note: {bundle.name} is an INT8 bundle made for {trt_plan.quantization_target(info)}; TensorRT "
              "engines are built from a --target tensorrt export (megaedge doctor --bundle says what blocks this "
              "one)", file=sys.stderr)
    verdict = "fits" if result.fits else "does NOT fit"
    print(f"{bundle.name} as {precision} engines, {args.max_audio_seconds:g} s audio + {args.max_new_tokens} new "
          f"tokens, budget {result.budget_mib / 1024:.2f} GiB: {verdict}")
    for label, value in (("weights", result.weights_mib), ("KV cache (fp16)", result.kv_mib),
                         ("activations", result.activations_mib), ("workspace", result.workspace_mib),
                         ("CUDA context", result.context_mib), ("total", result.total_mib)):
        print(f"  {label:<16} {value / 1024:7.2f} GiB")
    print(f"  largest audio that fits: {result.max_audio_seconds:g} s per segment (longer files run in 30 s "
          f"segments); memory left for the KV cache beside a {args.max_audio_seconds:g} s plan: "
          f"{result.max_kv_tokens} tokens' worth")
    return 0


def _fixed_kv_plan(args, bundle, info) -> int:
    import json

    from megaedge.errors import MegaedgeError
    from megaedge.runtime import gpu_plan

    if args.device:
        if args.device not in gpu_plan.DEVICES:
            raise MegaedgeError(f"--device {args.device!r} is not one of {sorted(gpu_plan.DEVICES)}; or pass --memory")
        memory = gpu_plan.DEVICES[args.device]["usable_gib"]
    else:
        memory = parse_memory(args.memory or "8GB")
    result = gpu_plan.plan(bundle, memory, args.streams, args.max_audio_seconds, info, args.batch_steps)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    verdict = "fits" if result.fits else "does NOT fit"
    weights = result.assumptions["weights"]
    print(f"{bundle.name} on onnxruntime CUDA ({weights} weights, fixed KV of {result.max_kv_length} positions), "
          f"{args.streams} stream(s), budget {result.budget_mib / 1024:.2f} GiB: {verdict}")
    slots = result.kv_slots
    for label, value in (("weights", result.weights_mib), (f"KV buffers x{slots}", result.kv_mib_per_stream * slots),
                         ("activations", result.activations_mib), ("CUDA context", result.context_mib),
                         ("total", result.total_mib)):
        print(f"  {label:<16} {value / 1024:7.2f} GiB")
    print(f"  streams that fit: {result.max_streams} ({result.kv_mib_per_stream:.0f} MiB of KV each"
          + (f", allocated {result.bank_slots} at a time for batched steps; --batch-steps 1: one at a time"
             if result.bank_slots > 1 else "")
          + f"); each call holds at most {result.max_kv_length} positions (prompt + new tokens)")
    return 0
