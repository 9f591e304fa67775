"""``megaedge export --int8``: FP32 bundle -> calibrated INT8 bundle + a per-condition accuracy report.

The report (``quant_report.json`` + ``quant_report.md`` in the bundle) compares, on a labelled clip set, the FP32
bundle with the INT8 bundle and with two references the field taught us to distrust: naive per-tensor dynamic INT8,
and the same recipe calibrated on clean audio only.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaedge.errors import MegaedgeError
from megaedge.export import quantize
from megaedge.progress import track
from megaedge.runtime import audio as audio_io
from megaedge.runtime import manifest
from megaedge.runtime.evaluate import group_keys, normalize, read_set

log = logging.getLogger("megaedge.export.int8")


@dataclass(frozen=True)
class Int8Options:
    target: str = "cpu"
    recipe: str | None = None  # default: the target's recipe
    calib: str | None = None  # DIR or JSONL; default: the fixture's shipped wild-audio calibration clips
    calib_cache: str | None = None
    eval_set: str | None = None  # default: the fixture's held-out clips
    report: bool = True
    compare: bool = True  # also build naive and clean-calibrated variants for the report

    def chosen_recipe(self) -> quantize.Int8Recipe:
        return quantize.Int8Recipe.named(self.recipe) if self.recipe else quantize.Int8Recipe.for_target(self.target)


def calibration_items(location: str | None) -> tuple[list[dict], str]:
    from megaedge import fixture

    if location is None:
        return read_set(fixture.calibration_manifest()), "megaedge fixture calibration clips (wild audio)"
    path = Path(location).expanduser()
    if path.is_file():
        return read_set(path), str(path.name)
    if path.is_dir():
        manifest_file = path / "manifest.jsonl"
        if manifest_file.is_file():
            return read_set(manifest_file), path.name
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".wav", ".flac", ".ogg", ".mp3"))
        if not files:
            raise MegaedgeError(f"{path}: no audio files for calibration (wav/flac/ogg/mp3, or a manifest.jsonl)")
        return [{"path": str(p), "text": "", "scenario": "unlabelled"} for p in files], path.name
    raise MegaedgeError(f"--calib {path}: no such file or directory")


def int8_from_fp32(fp32_bundle: Path, out: Path, options: Int8Options) -> manifest.Manifest:
    recipe = options.chosen_recipe()
    items, source = calibration_items(options.calib)
    cache = Path(options.calib_cache).expanduser() if options.calib_cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    info = quantize.quantize_bundle(fp32_bundle, out, recipe, items, options.target, cache, source)
    if not options.report:
        return info
    from megaedge import fixture

    eval_items = read_set(options.eval_set or fixture.heldout_manifest())
    variants = {"int8": out}
    with tempfile.TemporaryDirectory(prefix=".megaedge-int8-", dir=out.parent) as tmp:
        if options.compare:
            naive = Path(tmp) / "naive"
            quantize.quantize_bundle(fp32_bundle, naive, quantize.RECIPES["naive"], items, options.target)
            variants["naive_per_tensor"] = naive
            clean = [it for it in items if it.get("scenario") == "clean"]
            if clean and "static" in (recipe.encoder, recipe.decoder):
                clean_out = Path(tmp) / "clean"
                quantize.quantize_bundle(fp32_bundle, clean_out, recipe, clean or items, options.target)
                variants["clean_calibration"] = clean_out
        report = compare(fp32_bundle, variants, eval_items)
    report["recipe"] = info.quantization["recipe"]
    report["target"] = options.target
    report["calibration"] = {"clips": len(items), "source": source}
    (out / manifest.QUANT_REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out / manifest.QUANT_REPORT_MD).write_text(format_report(report) + "\n")
    # The report files are part of the bundle: list them with their hashes.
    doc = info.to_dict()
    for name in (manifest.QUANT_REPORT_JSON, manifest.QUANT_REPORT_MD):
        doc["files"][name] = manifest.sha256_file(out / name)
    info = manifest.Manifest.from_dict(doc)
    manifest.write(info, out)
    return info


def _route_for(info: manifest.Manifest) -> str:
    """The route a user gets by default: the router decides when there is one, else the LoRA route."""
    return "lora" if info.routed and not info.router else "auto"


def compare(fp32_bundle: Path, variants: dict[str, Path | tuple[Path, dict]], items: list[dict]) -> dict:
    """Per group: WER of FP32 and each variant, token agreement and encoder cosine vs FP32, loop/empty rates. A
    variant is a bundle, or (bundle, Transcriber.from_bundle options): one bundle run two ways is two variants."""
    from megaedge.runtime.transcriber import Transcriber

    jiwer = __import__("jiwer")
    arms = {name: v if isinstance(v, tuple) else (v, {}) for name, v in {"fp32": fp32_bundle, **variants}.items()}
    bundles = {name: path for name, (path, _) in arms.items()}
    # No speech gate: the report measures what quantization changes, on every clip the decoder sees.
    trs = {name: Transcriber.from_bundle(path, verify=False, **{"vad": "off", **options})
           for name, (path, options) in arms.items()}
    rows = []
    for item in track(items, desc="quantization report", unit="clip"):
        samples = audio_io.load(item["path"])
        row = {"id": item.get("id"), "groups": group_keys(item), "ref": normalize(item["text"])}
        ref_enc = None
        for name, tr in trs.items():
            result = tr.transcribe(samples, route=_route_for(tr.manifest))
            gate = 1.0 if result.route in ("lora", "merged") else 0.0
            enc = tr.encode(samples, gate=gate).astype(np.float32)
            if name == "fp32":
                ref_enc = enc
            cos = float(np.sum(enc * ref_enc) / (np.linalg.norm(enc) * np.linalg.norm(ref_enc) + 1e-12))
            row[name] = {"hyp": normalize(result.text), "tokens": result.token_ids, "loop": result.loop_guard,
                         "cosine": cos}
        rows.append(row)
    groups = sorted({g for r in rows for g in r["groups"]}, key=lambda k: (k != "all", k not in ("clean", "degraded"), k))
    table = {}
    for group in groups:
        sel = [r for r in rows if group in r["groups"]]
        refs = [r["ref"] or "<empty>" for r in sel]
        entry = {"clips": len(sel)}
        for name in bundles:
            entry[f"wer_{name}"] = round(100 * jiwer.wer(refs, [r[name]["hyp"] for r in sel]), 2)
            entry[f"empty_{name}"] = round(100 * np.mean([not r[name]["hyp"] for r in sel]), 2)
            entry[f"loop_{name}"] = round(100 * np.mean([r[name]["loop"] for r in sel]), 2)
            if name != "fp32":
                entry[f"agree_{name}"] = round(token_agreement([r["fp32"]["tokens"] for r in sel],
                                                               [r[name]["tokens"] for r in sel]), 2)
                entry[f"cosine_{name}"] = round(float(np.mean([r[name]["cosine"] for r in sel])), 5)
        table[group] = entry
    sizes = {name: round(sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".onnx", ".data")) / 2**20, 2)
             for name, path in bundles.items()}
    return {"groups": table, "size_mib": sizes, "variants": list(bundles)}


def token_agreement(refs: list[list[int]], hyps: list[list[int]]) -> float:
    """100 * (1 - token edit distance / reference tokens), over all clips: 100 means identical outputs."""
    import jiwer

    ref_s = [" ".join(map(str, r)) if r else "<empty>" for r in refs]
    hyp_s = [" ".join(map(str, h)) for h in hyps]
    return 100.0 * (1.0 - jiwer.wer(ref_s, hyp_s))


def format_report(report: dict) -> str:
    """Markdown: WER and agreement of every variant; cosine/loop/empty of the primary one (the shipped INT8)."""
    names = [n for n in report["variants"] if n != "fp32"]
    primary = "int8" if "int8" in names else names[0]
    head = ["group", "clips", "WER fp32"] + [f"WER {n}" for n in names] + [f"agree {n}" for n in names]
    head += [f"enc cos {primary}", f"loop % {primary}", f"empty % {primary}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, e in report["groups"].items():
        cells = [group, str(e["clips"]), f"{e['wer_fp32']:.2f}"] + [f"{e[f'wer_{n}']:.2f}" for n in names]
        cells += [f"{e[f'agree_{n}']:.2f}" for n in names]
        cells += [f"{e[f'cosine_{primary}']:.4f}", f"{e[f'loop_{primary}']:.1f}", f"{e[f'empty_{primary}']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{k} {v:.1f} MiB" for k, v in report["size_mib"].items())
    return "\n".join(lines) + f"\n\nGraph sizes: {sizes}."


def export_int8(model_path, out_dir, export_options, int8_options: Int8Options, **kwargs) -> Path:
    """Export FP32 (validated) into a staging folder beside ``out_dir``, quantize there, then rename the INT8
    bundle in: an interrupted run leaves no bundle, and its staging folder is removed (or cleared by the next run)."""
    import os

    from megaedge import staging as staged
    from megaedge.export.bundle import _check_output, export_bundle

    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    protected = (model_path, kwargs.get("adapter"), kwargs.get("router"), int8_options.calib,
                 int8_options.calib_cache, int8_options.eval_set)
    staged.clear_stale(out.parent, out.name)
    _check_output(out, export_options.force, protected)
    tmp = staged.make_staging(out.parent, out.name)
    try:
        fp32 = export_bundle(model_path, tmp / "fp32", export_options, **kwargs)
        staging = tmp / "int8"
        int8_from_fp32(fp32, staging, int8_options)
        _check_output(out, export_options.force, protected)  # again: minutes have passed
        staging.chmod(0o755)
        staged.replace_dir(staging, out)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
            raise staged.not_writable(out.parent, exc) from exc
        raise
    finally:
        # Success, failure, Ctrl-C or SIGTERM (megaedge.cli.signals): the FP32 bundle and any INT8 remains go.
        shutil.rmtree(tmp, ignore_errors=True)
    return out
