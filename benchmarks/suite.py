"""Side by side on this machine: transformers fp32 reference generate vs megaedge ORT FP32 vs ORT INT8 (CPU), or
transformers fp16 vs megaedge FP16 on onnxruntime's CUDA execution provider (``--device cuda``).

INT8 five ways: the default ``cpu-float-encoder`` (encoder FP32, decoder weight-only int8 in blocks of 32; prompt
and steps in megaedge's native kernels), ``cpu`` (as it with an int8 encoder and blocks of 128: smaller and faster,
less exact), ``cpu-fast`` (as cpu with the encoder's conv stem int8 in the graph; opt-in, it costs accuracy in
reverberation, see README), ``cpu-prefill`` run with ``prefill="ort"`` (its second decoder graph, dynamic int8
activations, runs the prompt in onnxruntime; steps native) and ``cpu-int4`` (the decode graph's layer weights in
4-bit blocks, all in onnxruntime).

Random-weight checkpoints at the real 0.6B / 1.7B geometry, the same speech-like audio (10 s and 30 s) and the same
forced token count (EOS ignored) for every contender. Each measurement runs in a fresh process (clean peak-RSS
figures), and contenders are interleaved round by round so a slow spell of the machine hits all of them; medians
are reported. Also measured: cold load of the default INT8 bundle (``cpu-float-encoder``), process start -> first
token ready.

    python benchmarks/suite.py --work DIR [--geometries 0.6b,1.7b] [--audio 10,30] [--tokens 32] [--rounds 2]
                              [--label zen4 --machine-class "2-core EPYC VM (Zen 4), AVX512-VNNI"]
    python benchmarks/suite.py --work DIR --device cuda --geometries 1.7b     # needs onnxruntime-gpu and CUDA torch

Writes benchmarks/results/suite_<geometry>[_<label>].json (suite_cuda_<geometry>.json with --device cuda, named
after the GPU) and rewrites suite.md (benchmarks/report.py; plots: report.py --plot DIR). Needs ~3x the fp32 model
of free disk and, at 1.7B, ~18 GiB RAM for the export step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import provenance
import report

from megaedge.runtime import machine

RESULTS = Path(__file__).resolve().parent / "results"
CONTENDERS = ("transformers_fp32", "megaedge_fp32", "megaedge_int8", "megaedge_int8_float_encoder",
              "megaedge_int8_fast", "megaedge_int8_prefill", "megaedge_int4")
CUDA_CONTENDERS = ("transformers_fp16", "megaedge_fp16")  # the reference first: speed-ups are against it
COLD_CONTENDER, COLD_RECIPE = "megaedge_int8_float_encoder", "cpu-float-encoder"  # what `export --int8` writes
PREFILL_ENGINES = {"megaedge_int8_prefill": "ort"}  # Transcriber.from_bundle(prefill=...); "auto" for the others

# VmHWM belongs to the process's own address space; ru_maxrss survives exec and would report the parent's size.
_PEAK = """
from megaedge.runtime.bench import peak_rss_mib
def peak_rss_gib():
    return peak_rss_mib() / 1024
"""

_REFERENCE = _PEAK + """
import json, sys, time
import numpy as np, torch
from megaedge.export.loader import load_checkpoint
from megaedge.export.reference import prompt_inputs
from megaedge.runtime.bench import speech_like_audio
torch.set_num_threads(int(sys.argv[4]))
cuda = sys.argv[5] == "cuda"
loaded = load_checkpoint(sys.argv[1], lora="merge", load_router=False)
if cuda:
    loaded.model.to("cuda", torch.float16)
def ready(seconds):
    inputs = prompt_inputs(loaded, speech_like_audio(seconds), None, None)
    if not cuda:
        return inputs
    return {k: (v.to("cuda", torch.float16) if v.is_floating_point() else v.to("cuda")) if hasattr(v, "to") else v
            for k, v in inputs.items()}
def now():
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()
out = {}
for seconds in json.loads(sys.argv[2]):
    inputs = ready(seconds)
    tokens = int(sys.argv[3])
    with torch.no_grad():
        loaded.model.generate(**ready(1.0), max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        t0 = now()
        first = loaded.model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t1 = now()
        full = loaded.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        t2 = now()
    total = t2 - t1
    out[str(seconds)] = {"first_token": t1 - t0, "total": total, "rtf": total / seconds,
                         "tokens": int(full.shape[1] - inputs["input_ids"].shape[1]),
                         "decode_tokens_per_s": (tokens - 1) / max(total - (t1 - t0), 1e-9)}
out["peak_rss_gib"] = peak_rss_gib()
if cuda:
    out["gpu_memory_gib"] = torch.cuda.max_memory_reserved() / 2**30
print(json.dumps(out))
"""

_RUNTIME = _PEAK + """
import json, sys
from megaedge.runtime.bench import speech_like_audio
from megaedge.runtime.bench import gpu_memory_mib
from megaedge.runtime.transcriber import Transcriber
cuda = sys.argv[5] == "cuda"
tr = Transcriber.from_bundle(sys.argv[1], verify=False, threads=int(sys.argv[4]), providers=("cuda",) if cuda else ("cpu",),
                             prefill=sys.argv[6], vad="off")
tr.transcribe(speech_like_audio(1.0), max_new_tokens=2, ignore_eos=True, loop_guard=False)  # warm-up
out = {}
for seconds in json.loads(sys.argv[2]):
    r = tr.transcribe(speech_like_audio(seconds), max_new_tokens=int(sys.argv[3]), ignore_eos=True, segment_seconds=None,
                      loop_guard=False)
    t = r.timings
    out[str(seconds)] = {"first_token": t["frontend"] + t["encoder"] + t["prefill"], "total": t["total"],
                         "rtf": t["rtf"], "tokens": len(r.token_ids), "encoder": t["encoder"], "prefill": t["prefill"],
                         "decode_tokens_per_s": t["decode_tokens"] / t["decode"]}
out["peak_rss_gib"] = peak_rss_gib()
if cuda:  # onnxruntime's arena as nvidia-smi sees it: the machine runs nothing else
    out["gpu_memory_gib"] = gpu_memory_mib() / 1024
print(json.dumps(out))
"""

# Each build step runs in a fresh process: an export's peak (~18 GiB at 1.7B) is not given back to the OS, and a
# parent still holding it got the next step OOM-killed on a 24 GiB machine.
_CHECKPOINT = """
import sys
from pathlib import Path
from megaedge.export.factory import write_checkpoint
write_checkpoint(Path(sys.argv[1]), sys.argv[2], "mega", seed=0)
print("{}")
"""

_EXPORT = """
import sys
from pathlib import Path
from megaedge.export.bundle import ExportOptions, export_bundle
export_bundle(Path(sys.argv[1]), Path(sys.argv[2]), ExportOptions(precision=sys.argv[3], force=True))
print("{}")
"""

_QUANTIZE = """
import sys
from pathlib import Path
from megaedge.export.int8 import calibration_items
from megaedge.export.quantize import RECIPES, quantize_bundle
items, source = calibration_items(None)
quantize_bundle(Path(sys.argv[1]), Path(sys.argv[2]), RECIPES[sys.argv[3]], items, "cpu", None, source)
print("{}")
"""

_COLD = """
import sys, time
from megaedge.runtime.bench import speech_like_audio
from megaedge.runtime.transcriber import Transcriber
tr = Transcriber.from_bundle(sys.argv[1], use_prepared=sys.argv[2] == "prepared", vad="off")
tr.transcribe(speech_like_audio(1.0), max_new_tokens=1, ignore_eos=True, loop_guard=False)
print(time.time())
"""


def _python(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cold_load(bundle: Path, rounds: int) -> dict:
    """Seconds from process start (before Python itself starts) to the first token of a 1 s clip, with the
    machine's prepared copies (``megaedge prepare``, made here first) and without, interleaved. The bundle is
    verified by the prepare step, so neither arm re-hashes it."""
    from megaedge.runtime import prepared

    prepared.prepare(bundle)
    times: dict[str, list[float]] = {"prepared": [], "unprepared": []}
    for r in range(rounds):
        for arm in (("prepared", "unprepared") if r % 2 == 0 else ("unprepared", "prepared")):
            start = time.time()
            proc = subprocess.run([sys.executable, "-c", _COLD, str(bundle), arm], capture_output=True, text=True,
                                  check=True)
            times[arm].append(float(proc.stdout.strip().splitlines()[-1]) - start)
    return {arm: {"median": round(float(np.median(v)), 2), "all": [round(c, 2) for c in v]}
            for arm, v in times.items()}


def build(geometry: str, work: Path, device: str = "cpu") -> dict:
    ckpt, fp32 = work / "checkpoint", work / "bundle-fp32"
    int8, prefill, int4 = work / "bundle-int8", work / "bundle-int8-prefill", work / "bundle-int4"
    fast, float_encoder = work / "bundle-int8-fast", work / "bundle-int8-float-encoder"
    if not (ckpt / ".done").exists():
        _python(_CHECKPOINT, str(ckpt), geometry)
        (ckpt / ".done").touch()
    if device == "cuda":  # what `megaedge export --preset gpu` writes
        fp16 = work / "bundle-fp16"
        if not (fp16 / "megaedge.json").exists():
            _python(_EXPORT, str(ckpt), str(fp16), "fp16")
        return {"transformers_fp16": ckpt, "megaedge_fp16": fp16}
    if not (fp32 / "megaedge.json").exists():
        _python(_EXPORT, str(ckpt), str(fp32), "fp32")
    for recipe, out in (("cpu", int8), ("cpu-float-encoder", float_encoder), ("cpu-fast", fast),
                        ("cpu-prefill", prefill), ("cpu-int4", int4)):
        if not (out / "megaedge.json").exists():
            _python(_QUANTIZE, str(fp32), str(out), recipe)
    return {"transformers_fp32": ckpt, "megaedge_fp32": fp32, "megaedge_int8": int8,
            "megaedge_int8_float_encoder": float_encoder, "megaedge_int8_fast": fast,
            "megaedge_int8_prefill": prefill, "megaedge_int4": int4}


def _cpu_label() -> str:
    """The CPU's name and its widest int8 instructions: VMs of one vendor all call themselves "AMD EPYC"."""
    facts = machine.cpu_facts()
    return f"{facts['model']} ({facts['int8_features'][-1] if facts['int8_features'] else 'no int8 SIMD'})"


def _median(rows: list[dict], key: str) -> float:
    return round(float(np.median([r[key] for r in rows])), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--geometries", default="0.6b,1.7b")
    parser.add_argument("--audio", default="10,30")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cold-rounds", type=int, default=4)
    parser.add_argument("--cold-only", action="store_true", help="only re-measure the cold start of existing "
                                                                  "bundles and update results/suite_*.json")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--label", default="", help="a machine label for the result's name: suite_<geometry>_<label>"
                                                    ".json beside other machines' (default: suite_<geometry>.json)")
    parser.add_argument("--machine-class", help="how tables name this machine (\"2-core AMD EPYC VM (Zen 4), "
                                                  "AVX512-VNNI\"); default: its CPU model and widest int8 feature")
    args = parser.parse_args()
    suffix = f"_{args.label}" if args.label else ""
    started, commit = time.strftime("%Y-%m-%dT%H:%M:%S%z"), provenance.commit()  # the code that ran
    lengths = [float(v) for v in args.audio.split(",")]
    cuda = args.device == "cuda"
    contenders, prefix = (CUDA_CONTENDERS, "suite_cuda") if cuda else (CONTENDERS, "suite")
    for geometry in args.geometries.split(","):
        paths = build(geometry, args.work / geometry, args.device)
        if args.cold_only:
            out = RESULTS / f"suite_{geometry}{suffix}.json"
            result = json.loads(out.read_text())
            cold = cold_load(paths[COLD_CONTENDER], args.cold_rounds)
            result["int8_cold_start_recipe"] = COLD_RECIPE
            result["int8_cold_start_to_first_token_s"] = cold["prepared"]
            result["int8_cold_start_unprepared_s"] = cold["unprepared"]
            result["cold_start_run"] = {"date": started, "commit": commit,
                                        "command": provenance.command({args.work: "DIR"})}
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(geometry, json.dumps(cold), flush=True)
            continue
        runs: dict[str, list[dict]] = {name: [] for name in contenders}
        common = (json.dumps(lengths), str(args.tokens), str(args.threads), args.device)
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                code = _REFERENCE if name.startswith("transformers") else _RUNTIME
                runs[name].append(_python(code, str(paths[name]), *common, PREFILL_ENGINES.get(name, "auto")))
                print(f"{geometry} round {r} {name}: {json.dumps(runs[name][-1])}", flush=True)
        result = {"date": started, "commit": commit, "command": provenance.command({args.work: "DIR"}),
                  "machine_class": args.machine_class,
                  "geometry": geometry, "tokens": args.tokens, "threads": args.threads, "rounds": args.rounds,
                  "device": args.device, "machine": (machine.gpu_name() or "unknown GPU") if cuda else _cpu_label(),
                  "contenders": {}}
        for name, rows in runs.items():
            entry = {"peak_rss_gib": round(max(r["peak_rss_gib"] for r in rows), 2)}
            if cuda:
                entry["gpu_memory_gib"] = round(max(r["gpu_memory_gib"] for r in rows), 2)
            for seconds in lengths:
                per = [r[str(seconds)] for r in rows]
                entry[f"{seconds:g}s"] = {k: _median(per, k) for k in per[0]}
                # a slow spell of the machine can hit one contender's rounds more than another's: keep them all
                entry[f"{seconds:g}s"]["total_by_round"] = [round(p["total"], 2) for p in per]
            result["contenders"][name] = entry
        for seconds in lengths:
            ref = result["contenders"][contenders[0]][f"{seconds:g}s"]["rtf"]
            for name in contenders[1:]:
                mine = result["contenders"][name][f"{seconds:g}s"]
                mine["rtf_speedup_vs_transformers"] = round(ref / mine["rtf"], 2)
        if not cuda:
            cold = cold_load(paths[COLD_CONTENDER], args.cold_rounds)
            result["int8_cold_start_recipe"] = COLD_RECIPE
            result["int8_cold_start_to_first_token_s"] = cold["prepared"]
            result["int8_cold_start_unprepared_s"] = cold["unprepared"]
        (RESULTS / f"{prefix}_{geometry}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2), flush=True)
    report.main([])  # suite.md from every current result file



if __name__ == "__main__":
    main()
