"""``megaedge build-engines``: TensorRT engines from a bundle's ONNX graphs (needs TensorRT: Jetson or NVIDIA GPU)."""

from __future__ import annotations

import argparse

from megaedge.cli.common import add_engine_size_options

NAME = "build-engines"
HELP = "build TensorRT engines (fp16, or int8 from a --target tensorrt bundle) with profiles from the options"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `megaedge export`")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="FP16 engines from an fp32 bundle (default)")
    precision.add_argument("--int8", action="store_true", help="INT8 engines from the explicit Q/DQ of a bundle "
                                                               "exported with --int8 --target tensorrt")
    add_engine_size_options(parser)
    parser.add_argument("--timing-cache", help="timing cache file (read and updated; speeds up rebuilds)")


def check_int8_source(bundle, info) -> None:
    """``--int8`` builds from the explicit Q/DQ of an INT8 bundle quantized for TensorRT; refuse any other bundle."""
    from megaedge.errors import MegaedgeError
    from megaedge.runtime.tensorrt import int8_not_for_engines, quantization_target

    if info.precision != "int8" or int8_not_for_engines(info):
        raise MegaedgeError(f"{bundle}: --int8 needs a bundle exported with --int8 --target tensorrt "
                            f"(this one: {info.precision}, target {quantization_target(info)})")


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from megaedge.errors import MegaedgeError, require
    from megaedge.runtime import manifest
    from megaedge.runtime import tensorrt as rt

    bundle = Path(args.bundle)
    info = manifest.read(bundle)
    options = rt.EngineOptions(precision="int8" if args.int8 else "fp16", max_audio_seconds=args.max_audio_seconds,
                               max_new_tokens=args.max_new_tokens, workspace_mib=args.workspace,
                               timing_cache=args.timing_cache)
    if options.precision == "int8":
        check_int8_source(bundle, info)
    errors = [f for f in rt.check_bundle(bundle, info) if f.level == "error"]
    if errors:
        raise MegaedgeError(f"{bundle}: not ready for TensorRT: {errors[0].graph}: {errors[0].message}"
                            + (f" (and {len(errors) - 1} more; see megaedge doctor --bundle)" if len(errors) > 1 else ""))
    trt = require("tensorrt", "trt")
    gpu, capability = rt.gpu_identity()
    shapes = rt.profiles(info, options)
    engines = {}
    for name in ("encoder", "decoder"):
        start = time.perf_counter()
        rt.build_engine(bundle / info.graph(name).file, bundle / rt.ENGINE_FILES[name], shapes[name], options)
        engines[name] = {"file": rt.ENGINE_FILES[name], "tensorrt_version": trt.__version__, "gpu_name": gpu,
                         "compute_capability": capability, "precision": options.precision,
                         "profiles": shapes[name], "build_seconds": round(time.perf_counter() - start, 1),
                         "options": {"max_audio_seconds": options.max_audio_seconds,
                                     "max_new_tokens": options.max_new_tokens, "workspace_mib": options.workspace_mib}}
        print(f"{name}: {rt.ENGINE_FILES[name]} in {engines[name]['build_seconds']} s", flush=True)
    doc = json.loads(json.dumps(info.to_dict()))
    doc["engines"] = engines
    for name in engines:
        doc["files"][rt.ENGINE_FILES[name]] = manifest.sha256_file(bundle / rt.ENGINE_FILES[name])
    manifest.write(manifest.Manifest.from_dict(doc), bundle)
    return 0
