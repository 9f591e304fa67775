"""Export a random-weight checkpoint at a real geometry and measure it: export time, peak RSS, bundle size, and the
runtime's peak RSS for merged and routed bundles (each step in a fresh process, so peaks do not mix).

    python benchmarks/export_geometry.py --geometry 1.7b --work /tmp/megaedge-bench [--modes merged,routed]

Writes benchmarks/results/export_<geometry>.json. Needs about 3x the fp32 model size of free disk.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# VmHWM belongs to the child's own address space; ru_maxrss survives exec and would include the parent's size at
# fork time (the parent wrote a multi-GB checkpoint).
_PEAK = """
from megaedge.runtime.bench import peak_rss_mib
def peak_rss_gib():
    return peak_rss_mib() / 1024
"""

_EXPORT = _PEAK + """
import json, sys, time
from megaedge.export.bundle import ExportOptions, export_bundle
t = time.perf_counter()
export_bundle(sys.argv[1], sys.argv[2], ExportOptions(mode=sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_gib": peak_rss_gib()}))
"""

_INT8 = _PEAK + """
import json, sys, time
from pathlib import Path
from megaedge.export.int8 import calibration_items
from megaedge.export.quantize import RECIPES, quantize_bundle
t = time.perf_counter()
items, source = calibration_items(None)
quantize_bundle(Path(sys.argv[1]), Path(sys.argv[2]), RECIPES[sys.argv[3]], items, "cpu", None, source)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_gib": peak_rss_gib()}))
"""

_RUN = _PEAK + """
import json, sys, time
import numpy as np
from megaedge.runtime.transcriber import Transcriber
t = time.perf_counter()
tr = Transcriber.from_bundle(sys.argv[1], route="lora" if sys.argv[2] == "routed" else "auto", verify=False,
                             vad="off")
load = time.perf_counter() - t
rng = np.random.default_rng(0)
audio = (0.1 * rng.standard_normal(160000)).astype(np.float32)
tr.transcribe(audio[:16000], max_new_tokens=2, ignore_eos=True, loop_guard=False)  # warm-up
res = tr.transcribe(audio, max_new_tokens=32, ignore_eos=True, loop_guard=False)
print(json.dumps({"load_seconds": load, "timings": res.timings,
                  "peak_rss_gib": peak_rss_gib()}))
"""


def _python(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _size(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 2**30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="1.7b", choices=("tiny", "0.6b", "1.7b"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--modes", default="merged,routed")
    parser.add_argument("--int8", default="cpu", help="INT8 recipe to build from the merged bundle ('' = none)")
    parser.add_argument("--keep", action="store_true", help="keep checkpoint and bundles")
    args = parser.parse_args(argv)
    from megaedge.export.factory import write_checkpoint

    work = args.work / args.geometry
    if work.exists():
        shutil.rmtree(work)
    t = time.perf_counter()
    ckpt = write_checkpoint(work / "checkpoint", args.geometry, "mega", seed=0)
    results = {"geometry": args.geometry, "machine": platform.processor() or platform.machine(),
               "checkpoint_write_seconds": round(time.perf_counter() - t, 1), "modes": {}}
    adapter = sum(p.stat().st_size for p in (ckpt / "mega-asr-merged").iterdir()) / 2**30
    for mode in args.modes.split(","):
        bundle = work / f"bundle-{mode}"
        exported = _python(_EXPORT, str(ckpt), str(bundle), mode)
        ran = _python(_RUN, str(bundle), mode)
        results["modes"][mode] = {"export_seconds": round(exported["seconds"], 1),
                                  "export_peak_rss_gib": round(exported["peak_rss_gib"], 2),
                                  "bundle_gib": round(_size(bundle), 3),
                                  "runtime_peak_rss_gib": round(ran["peak_rss_gib"], 2),
                                  "runtime_load_seconds": round(ran["load_seconds"], 2),
                                  "runtime_timings_10s_32tok": {k: round(v, 3) for k, v in ran["timings"].items()}}
        print(mode, json.dumps(results["modes"][mode]), flush=True)
    if args.int8 and "merged" in results["modes"]:
        bundle = work / "bundle-int8"
        made = _python(_INT8, str(work / "bundle-merged"), str(bundle), args.int8)
        ran = _python(_RUN, str(bundle), "merged")
        results["modes"]["int8-" + args.int8] = {
            "quantize_seconds": round(made["seconds"], 1), "quantize_peak_rss_gib": round(made["peak_rss_gib"], 2),
            "bundle_gib": round(_size(bundle), 3), "runtime_peak_rss_gib": round(ran["peak_rss_gib"], 2),
            "runtime_load_seconds": round(ran["load_seconds"], 2),
            "runtime_timings_10s_32tok": {k: round(v, 3) for k, v in ran["timings"].items()}}
        m, q = results["modes"]["merged"], results["modes"]["int8-" + args.int8]
        tps = lambda r: r["runtime_timings_10s_32tok"]["decode_tokens"] / r["runtime_timings_10s_32tok"]["decode"]  # noqa: E731
        results["int8_size_ratio"] = round(q["bundle_gib"] / m["bundle_gib"], 3)
        results["decode_tokens_per_s"] = {"fp32": round(tps(m), 2), "int8": round(tps(q), 2)}
        results["int8_decode_speedup"] = round(tps(q) / tps(m), 2)
        print("int8", json.dumps(q), flush=True)
    results["adapter_gib"] = round(adapter, 4)
    if {"merged", "routed"} <= set(results["modes"]):
        m, r = results["modes"]["merged"], results["modes"]["routed"]
        results["routed_over_merged_size_gib"] = round(r["bundle_gib"] - m["bundle_gib"], 3)
        results["routed_over_merged_rss_ratio"] = round(r["runtime_peak_rss_gib"] / m["runtime_peak_rss_gib"], 3)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"export_{args.geometry}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
