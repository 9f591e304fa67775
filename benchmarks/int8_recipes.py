"""Which INT8 recipe is the default: every recipe on the trained fixture, judged against FP32 per condition.

Builds the fixture's FP32 bundle (merged, or routed with --mode routed), quantizes it with each recipe from the same
wild-audio calibration clips, and compares all of them on a held-out set in one pass: WER per condition and
scenario with each recipe's delta against FP32 and its paired-bootstrap 95 % interval, token agreement with FP32,
encoder cosine, loop/empty rates, sizes. The set is the large one `megaedge calibrate --preset eval` builds (pass its
manifest as --eval-set; the 96 shipped held-out clips cannot resolve half a WER point per condition). Prints a table
and writes benchmarks/results/int8_recipes_fixture[_routed].json. Not a test: it is the evidence the default recipe
cites. Usage: python benchmarks/int8_recipes.py [--recipes cpu,cpu-dynamic,...] [--mode merged|routed]
[--eval-set MANIFEST] [--stem-arms] [--kv-arms] [--work DIR] [--out F]

A recipe name may carry overrides of its fields after '@', joined by '+', to find which part of a recipe costs
accuracy (ablations, layers kept float): ``cpu@encoder=float``, ``cpu@decoder=float``,
``cpu@float_scopes=layers.0.;layers.1.`` (tuple fields take ';'-separated items), ``cpu@reduce_range=false``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import provenance

from megaedge import fixture
from megaedge.export.bundle import ExportOptions, export_bundle
from megaedge.export.int8 import calibration_items, compare, format_report
from megaedge.export.quantize import RECIPES, Int8Recipe, quantize_bundle
from megaedge.runtime import kernels, machine
from megaedge.runtime.evaluate import read_set

RESULTS = Path(__file__).resolve().parent / "results"
# --kernels: the build, and where the CPU class it stands for runs the encoder's stem (native needs int8 dot
# products: an ARM dot-product CPU has them, the portable build that equals its bits does not; AVX2 does not)
KERNEL_CLASSES = {"portable": "native", "avx2": "ort", "vnni": "native"}


def recipe(spec: str) -> Int8Recipe:
    """A recipe by name, with optional field overrides: NAME@field=value+field=value."""
    name, _, overrides = spec.partition("@")
    if name not in RECIPES:
        raise SystemExit(f"--recipes: {name!r} is not one of {sorted(RECIPES)}")
    fields = {f.name: f for f in dataclasses.fields(Int8Recipe)}
    changes = {"name": spec}
    for item in filter(None, overrides.split("+")):
        key, eq, value = item.partition("=")
        if key not in fields or not eq or key == "name":
            raise SystemExit(f"--recipes: override {item!r} is not FIELD=VALUE with FIELD one of {sorted(fields)}")
        current = getattr(RECIPES[name], key)
        if isinstance(current, bool):
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"--recipes: {key} takes true or false, not {value!r}")
            changes[key] = value.lower() == "true"
        elif isinstance(current, tuple):
            changes[key] = tuple(v for v in value.split(";") if v)
        elif isinstance(current, (int, float)):
            changes[key] = type(current)(value)
        else:
            changes[key] = value
    return dataclasses.replace(RECIPES[name], **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--mode", choices=("merged", "routed"), default="merged")
    parser.add_argument("--work", help="keep bundles here (default: a temporary directory)")
    parser.add_argument("--eval-set", help="labelled JSONL set (default: the fixture's 96 held-out clips)")
    parser.add_argument("--machine-class", help="words for the machine, recorded in the result")
    parser.add_argument("--stem-arms", action="store_true",
                        help="recipes with a native stem run twice: with it (NAME) and with onnxruntime's float stem "
                             "(NAME/ort-stem)")
    parser.add_argument("--kv-arms", action="store_true",
                        help="also run each recipe with its native decoder's KV caches in float16 (kv_cache), "
                             "as an arm of its own")
    parser.add_argument("--kernels", choices=sorted(KERNEL_CLASSES),
                        help="run megaedge's native kernels of this build instead of this CPU's best, with the stem "
                             "where that CPU class runs it: portable stands for the ARM dot-product build, which "
                             "equals it bit for bit (tests/runtime/test_kernel_crosscheck.py, under qemu); avx2 for "
                             "an AVX2-only CPU (its stem in onnxruntime)")
    parser.add_argument("--out", help="results file name under benchmarks/results (default: "
                                      "int8_recipes_fixture[_routed].json)")
    args = parser.parse_args()
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    recipes = {n: recipe(n) for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        fp32 = work / f"fp32-{args.mode}"
        if not (fp32 / "megaedge.json").is_file():
            export_bundle(fixture.model_dir(), fp32, ExportOptions(mode=args.mode, force=True))
        items, source = calibration_items(None)
        seconds, variants = {}, {}
        for name in names:
            start = time.perf_counter()
            folder = work / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            variants[name] = quantize_bundle(fp32, folder, recipes[name], items, "cpu", None, source) and folder
            seconds[name] = round(time.perf_counter() - start, 1)
        if args.stem_arms:
            for name in names:
                if recipes[name].native_stem:
                    variants[f"{name}/ort-stem"] = (variants[name], {"stem": "ort"})
                    variants[name] = (variants[name], {"stem": "native"})
        if args.kv_arms:
            for name in names:
                path, options = variants[name] if isinstance(variants[name], tuple) else (variants[name], {})
                variants[f"{name}/kv-float16"] = (path, {**options, "kv_cache": "float16"})
        if args.kernels:
            kernels.pin(kernels.Q8Kernels(kernels.build(variant=args.kernels)))
            # decode steps and prompt native, the stem where the class runs it ("auto" would decide by this CPU)
            stem = KERNEL_CLASSES[args.kernels]
            for name in names:
                if not isinstance(variants[name], tuple):
                    variants[name] = (variants[name], {"decode": "native", "prefill": "native",
                                                       "stem": stem if recipes[name].native_stem else "ort"})
        eval_set = args.eval_set or fixture.heldout_manifest()
        report = compare(fp32, variants, read_set(eval_set), say=lambda line: print(line, file=sys.stderr, flush=True))
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": provenance.commit(),
              "command": " ".join(["python", *sys.argv]),
              "machine": {**machine.cpu_facts(), "python": platform.python_version()},
              **({"machine_class": args.machine_class} if args.machine_class else {}),
              **({"kernels": kernels.load().isa} if args.kernels else {}),
              "eval_set": str(eval_set), **report}
    report["quantize_seconds"] = seconds
    report["recipes"] = {n: recipes[n].description + ("" if n in RECIPES else f" (overrides: {n.partition('@')[2]})")
                         for n in names}
    report["mode"] = args.mode
    print(format_report(report))
    suffix = "" if args.mode == "merged" else f"_{args.mode}"
    out = RESULTS / (args.out or f"int8_recipes_fixture{suffix}.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
