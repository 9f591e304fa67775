"""``megaedge doctor``: what this machine offers megaedge. Runs in a runtime-only install (no torch import)."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import platform
import shutil
import subprocess
import sys

from megaedge.runtime import machine

NAME = "doctor"
HELP = "report Python, onnxruntime providers, TensorRT, torch, audio devices, CPU, RAM and GPU"

_PACKAGES = ("numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "soundfile", "soxr", "torch", "transformers",
             "peft", "onnx", "onnxscript", "tensorrt", "polygraphy", "sounddevice", "jiwer", "pyroomacoustics")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--bundle", help="also check a bundle: every file against its digest (exit 1 if one "
                                         "fails), and its graphs for TensorRT (operators, opset, Q/DQ, uint8, "
                                         "int64, engine profiles vs the manifest)")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _onnxruntime() -> dict:
    info: dict = {"installed": [d for d in ("onnxruntime", "onnxruntime-gpu") if _version(d)]}
    warnings = []
    if len(info["installed"]) > 1:
        warnings.append(
            "onnxruntime and onnxruntime-gpu are both installed and overwrite each other's files: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu (or onnxruntime)"
        )
    try:
        import onnxruntime as ort

        info["version"] = ort.__version__
        info["available_providers"] = ort.get_available_providers()
        info["device"] = ort.get_device()
    except Exception as exc:  # a broken mixed install raises from deep inside the package
        info["error"] = f"{type(exc).__name__}: {exc}"
    if "CUDAExecutionProvider" in info.get("available_providers", []) and not _gpus():
        # onnxruntime-gpu lists CUDA/TensorRT even without a GPU and falls back to CPU silently.
        warnings.append("CUDAExecutionProvider is listed but no NVIDIA GPU was found: sessions will run on CPU")
    info["warnings"] = warnings
    return info


def _gpus() -> list[dict]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,memory.free,driver_version,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 5:
            gpus.append({"name": parts[0], "memory_total_mib": int(float(parts[1])), "memory_free_mib": int(float(parts[2])),
                         "driver": parts[3], "compute_capability": parts[4]})
    return gpus


def _audio_inputs() -> dict:
    if importlib.util.find_spec("sounddevice") is None:
        return {"available": False, "reason": "sounddevice not installed: pip install 'megaedge[mic]'"}
    try:
        import sounddevice as sd

        devices = [
            {"index": i, "name": d["name"], "channels": d["max_input_channels"], "default_rate": d["default_samplerate"]}
            for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0
        ]
        return {"available": True, "input_devices": devices}
    except (OSError, Exception) as exc:  # PortAudio missing raises OSError at import
        return {"available": False, "reason": f"{type(exc).__name__}: {exc} (apt-get install libportaudio2?)"}


def _tensorrt() -> dict:
    if importlib.util.find_spec("tensorrt") is None:
        return {"available": False, "reason": "tensorrt not installed (JetPack ships it; x86: pip install 'megaedge[trt]')"}
    try:
        import tensorrt as trt

        return {"available": True, "version": trt.__version__}
    except Exception as exc:
        return {"available": False, "reason": f"tensorrt present but not importable: {exc}"}


def _kernels() -> dict:
    """The native kernels this machine runs: a prebuilt variant of the package, or compiled here at first use (which
    this may do, as a transcription would)."""
    from megaedge.runtime import kernels

    return kernels.describe()


def collect() -> dict:
    return {
        "megaedge": _version("megaedge"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "torch_importable": importlib.util.find_spec("torch") is not None,
        "onnxruntime": _onnxruntime(),
        "tensorrt": _tensorrt(),
        "cpu": machine.cpu_facts(),
        "int8_recipe": _recipe(None),
        "kernels": _kernels(),
        "memory": machine.memory_facts(),
        "gpus": _gpus(),
        "audio": _audio_inputs(),
    }


def _print(report: dict) -> None:
    ort = report["onnxruntime"]
    print(f"megaedge     {report['megaedge']}  (python {report['python']}, {report['platform']})")
    cpu = report["cpu"]
    print(f"cpu          {cpu['model']} x{cpu['logical_cores']} [{', '.join(cpu['int8_features']) or 'no AVX2/VNNI'}]")
    print(f"             {cpu['int8_note']}")
    advice = report["int8_recipe"]
    print(f"int8 recipe  {advice['recommended']} for this CPU ({advice['cpu_class']}): "
          f"megaedge export --int8 --recipe {advice['recommended']}")
    kern = report["kernels"]
    if "error" in kern:
        print(f"kernels      none: {kern['error']}; decode steps run in onnxruntime")
    else:
        print(f"kernels      {kern['variant']}, {kern['origin']} (isa {kern['isa']}; {kern['path']})")
    mem = report["memory"]
    print(f"memory       {mem['total_gib']} GiB total, {mem['available_gib']} GiB available")
    if report["gpus"]:
        for gpu in report["gpus"]:
            print(f"gpu          {gpu['name']} {gpu['memory_total_mib']} MiB (free {gpu['memory_free_mib']}), "
                  f"cc {gpu['compute_capability']}, driver {gpu['driver']}")
    else:
        print("gpu          none found (nvidia-smi absent or no device)")
    print(f"onnxruntime  {ort.get('version', 'not importable')}  providers: {', '.join(ort.get('available_providers', []))}")
    trt = report["tensorrt"]
    print(f"tensorrt     {trt.get('version') if trt['available'] else trt['reason']}")
    print(f"torch        {report['packages']['torch'] or 'not installed (runtime-only install)'}"
          f"{'' if report['torch_importable'] or not report['packages']['torch'] else ' (not importable)'}")
    audio = report["audio"]
    if audio["available"]:
        names = [f"[{d['index']}] {d['name']}" for d in audio["input_devices"]]
        print(f"microphones  {', '.join(names) or 'no input devices'}")
    else:
        print(f"microphones  unavailable: {audio['reason']}")
    others = {k: v for k, v in report["packages"].items() if v and k not in ("torch",)}
    print("packages     " + ", ".join(f"{k} {v}" for k, v in others.items()))
    for warning in ort.get("warnings", []):
        print(f"WARNING      {warning}")
    if "error" in ort:
        print(f"ERROR        onnxruntime: {ort['error']}")
    files = report.get("bundle_files")
    if files:
        print(f"bundle files  all {files['count']} match their digests" if files["ok"] else
              f"ERROR        bundle files: {files['error']}")
    if report.get("bundle_digest"):
        pin = "pin it: --expect-digest" if not files or files["ok"] else "its files do not match: do not pin it"
        print(f"bundle digest {report['bundle_digest']}  ({pin})")
    if report.get("bundle_prepared"):
        state = report["bundle_prepared"]
        print(f"prepared      {state['state']}: {state['detail']}")
    bundle_recipe = report.get("bundle_recipe")
    if bundle_recipe and bundle_recipe["recipe"]:
        verdict = (f"WARNING {bundle_recipe['problem']} here: export with --int8 --recipe {advice['recommended']}"
                   if bundle_recipe["problem"] else "suits this CPU")
        print(f"bundle recipe {bundle_recipe['recipe']}: {verdict}")
    ready = report.get("tensorrt_readiness")
    if ready and ready.get("cpu_bundle"):  # not meant for TensorRT: one line, not a list of errors
        print(f"tensorrt-ready {ready['bundle']}: no, an INT8 bundle made for {ready['cpu_bundle']} (TensorRT "
              "engines come from megaedge export --int8 --target tensorrt)")
    elif ready:
        verdict = {True: "yes", False: "NO", None: "unknown (see the warning)"}[ready["ready"]]
        print(f"tensorrt-ready {ready['bundle']}: {verdict}")
        for f in ready["findings"]:
            print(f"  {f['level']:<8} {f['graph']}: {f['message']}")


def _recipe(recipe: str | None) -> dict:
    """The INT8 recipe to export for this CPU, and what is wrong with ``recipe`` (a bundle's) here."""
    from megaedge.runtime.recipe_advice import advise

    advice = advise(recipe)
    return {"recipe": recipe, "cpu_class": advice.cpu_class, "recommended": advice.recommended,
            "problem": advice.problem}


def _readiness(bundle: str) -> dict:
    from pathlib import Path

    from megaedge.runtime import manifest
    from megaedge.runtime.tensorrt import (
        Finding,
        check_bundle,
        int8_not_for_engines,
        profile_problems,
        quantization_target,
    )

    try:
        import onnx  # noqa: F401
    except ImportError:
        onnx = None
    if onnx is not None:
        findings = check_bundle(Path(bundle))
        ready = not any(f.level == "error" for f in findings)
    else:
        # A runtime-only install has no onnx: what the manifest alone tells is still reported (engine profiles,
        # the INT8 flavour), and the operator check is named as skipped rather than failing the whole report.
        info = manifest.read(bundle, verify=False)
        findings = [Finding("bundle", "warning", "operators and opset not checked: that needs the onnx package "
                                                 "(pip install onnx, or pip install 'megaedge[export]')")]
        if int8_not_for_engines(info):
            findings.append(Finding("bundle", "error", f"INT8 bundle made for {quantization_target(info)}: TensorRT "
                                                       "needs the explicit Q/DQ flavour (export with --int8 --target "
                                                       "tensorrt)"))
        for name, facts in (info.engines or {}).items():
            findings += [Finding(name, "error", problem) for problem in profile_problems(info, facts.get("profiles", []))]
        errors = any(f.level == "error" for f in findings)
        ready = False if errors else None  # None: not known without the operator check
    return {"bundle": bundle, "ready": ready,
            "findings": [{"graph": f.graph, "level": f.level, "message": f.message} for f in findings]}


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.bundle:
        from pathlib import Path

        from megaedge.errors import MegaedgeError
        from megaedge.runtime import manifest

        # The digest a deployment pins (--expect-digest): it covers the manifest and, through it, every file.
        report["bundle_digest"] = manifest.bundle_digest(args.bundle)
        info = manifest.read(args.bundle, verify=False)
        try:  # the digest above names the manifest; a file changed since export shows only here
            manifest.check_files(Path(args.bundle), info)
            report["bundle_files"] = {"ok": True, "count": len(info.files)}
        except MegaedgeError as exc:
            report["bundle_files"] = {"ok": False, "count": len(info.files), "error": str(exc)}
        recipe = ((info.quantization or {}).get("recipe") or {}).get("name")
        report["bundle_recipe"] = _recipe(recipe if isinstance(recipe, str) else None)
        report["tensorrt_readiness"] = _readiness(args.bundle)
        from megaedge.runtime.tensorrt import int8_not_for_engines, quantization_target

        if int8_not_for_engines(info):
            report["tensorrt_readiness"]["cpu_bundle"] = quantization_target(info)
        from megaedge.runtime import prepared

        state, detail = prepared.status(Path(args.bundle), info)
        report["bundle_prepared"] = {"state": state, "detail": detail}
    if args.json:
        from megaedge.cli.common import print_json

        print_json(report)
    else:
        _print(report)
    return 0 if report.get("bundle_files", {"ok": True})["ok"] else 1
