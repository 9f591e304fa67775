"""``megaedge export --int8``: FP32 bundle -> calibrated INT8 bundle + a per-condition accuracy report.

The report (``quant_report.json`` + ``quant_report.md`` in the bundle) compares, on a labelled clip set, the FP32
bundle with the INT8 bundle and with two references the field taught us to distrust: naive per-tensor dynamic INT8,
and the same recipe calibrated on clean audio only. Each group's WER delta against FP32 comes with a 95 % interval
from a paired bootstrap over utterances (``paired_delta``); a group is flagged only when its interval
excludes zero.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaedge.errors import MegaedgeError
from megaedge.export import quantize
from megaedge.progress import progress_enabled, track
from megaedge.runtime import audio as audio_io
from megaedge.runtime import manifest
from megaedge.runtime.evaluate import group_keys, normalize, read_set

log = logging.getLogger("megaedge.export.int8")
REPORT_CLIPS = (1, 100_000)
RESAMPLES = 2000
# The acceptance bar the report judges the shipped INT8 by (docs/int8.md): per group a WER delta of at most half a
# point whose 95 % interval stays under one point, and token agreement with FP32 of at least 99 %.
TARGET = {"max_delta": 0.5, "max_ci_high": 1.0, "min_agreement": 99.0}
# Below this many utterances a bootstrap interval says nothing (one clip resamples to itself: a zero-width
# "interval" that would flag a single changed word): such groups get the delta without interval, flag or verdict.
MIN_CLIPS_FOR_INTERVAL = 10


@dataclass(frozen=True)
class Int8Options:
    target: str = "cpu"
    recipe: str | None = None  # default: the target's recipe
    calib: str | None = None  # DIR or JSONL; default: the fixture's shipped wild-audio calibration clips
    calib_cache: str | None = None
    eval_set: str | None = None  # default: the fixture's held-out clips
    report: bool = True
    compare: bool = True  # also build naive and clean-calibrated variants for the report
    report_clips: int | None = None  # at most this many clips of the set, spread over its groups (None: all)

    def __post_init__(self):
        low, high = REPORT_CLIPS
        if self.report_clips is not None and not low <= self.report_clips <= high:
            raise MegaedgeError(f"--report-clips {self.report_clips} is outside {low}-{high}")

    def chosen_recipe(self) -> quantize.Int8Recipe:
        return quantize.Int8Recipe.named(self.recipe) if self.recipe else quantize.Int8Recipe.for_target(self.target)


# Paired bootstrap of a corpus-WER difference. Corpus WER is sum(word errors) / sum(reference words); both systems
# are scored on the SAME resample of utterances, so what they share (hard clips, easy clips) cancels and the
# interval measures only their difference.
def word_errors(ref: str, hyp: str) -> int:
    """Substitutions + deletions + insertions of ``hyp`` against ``ref`` (word level; jiwer's alignment)."""
    import jiwer

    out = jiwer.process_words(ref, hyp)
    return int(out.substitutions + out.deletions + out.insertions)


def paired_delta(errors_a, errors_b, words, resamples: int = RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(delta, low, high) in WER points of system b minus system a: the corpus delta and its percentile interval
    over ``resamples`` resamples of utterances with replacement (seeded: the same inputs give the same interval)."""
    a = np.asarray(errors_a, dtype=np.float64)
    b = np.asarray(errors_b, dtype=np.float64)
    n_words = np.asarray(words, dtype=np.float64)
    if not (a.shape == b.shape == n_words.shape) or a.ndim != 1 or a.size == 0:
        raise ValueError("errors_a, errors_b and words must be equally long, non-empty 1-D sequences")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"resamples {resamples} must be >= 1 and level {level} within (0, 1)")
    diff = b - a
    delta = 100.0 * diff.sum() / n_words.sum()
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    chunk = max(1, 2_000_000 // a.size)  # bounded memory for large sets
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        picks = rng.integers(0, a.size, (count, a.size))
        stats[start : start + count] = 100.0 * diff[picks].sum(axis=1) / n_words[picks].sum(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(stats, [tail, 100.0 - tail])
    return float(delta), float(low), float(high)


def calibration_items(location: str | None) -> tuple[list[dict], str]:
    from megaedge import fixture

    if location is None:
        return (read_set(fixture.calibration_manifest(), need_text=False),
                "megaedge fixture calibration clips (wild audio)")
    path = Path(location).expanduser()
    if path.is_file():
        return read_set(path, need_text=False), str(path.name)
    if path.is_dir():
        manifest_file = path / "manifest.jsonl"
        if manifest_file.is_file():
            return read_set(manifest_file, need_text=False), path.name
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".wav", ".flac", ".ogg", ".mp3"))
        if not files:
            raise MegaedgeError(f"{path}: no audio files for calibration (wav/flac/ogg/mp3, or a manifest.jsonl)")
        return [{"path": str(p), "text": "", "scenario": "unlabelled"} for p in files], path.name
    raise MegaedgeError(f"--calib {path}: no such file or directory")


def spread(items: list[dict], count: int | None) -> list[dict]:
    """At most ``count`` items, taken in turn from each scenario so that every group keeps its share; the set's
    own order within a scenario (deterministic: the same set and count give the same clips)."""
    if count is None or count >= len(items):
        return items
    by_scenario: dict[str, list[dict]] = {}
    for item in items:
        by_scenario.setdefault(str(item.get("scenario")), []).append(item)
    queues = [list(reversed(v)) for v in by_scenario.values()]
    chosen: list[dict] = []
    while len(chosen) < count:
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    order = {id(item): i for i, item in enumerate(items)}
    return sorted(chosen, key=lambda item: order[id(item)])


def int8_from_fp32(fp32_bundle: Path, out: Path, options: Int8Options,
                   say: Callable[[str], None] | None = None) -> manifest.Manifest:
    """Quantize; then, unless ``options.report`` is off, the report. ``say`` receives the report's cost, progress
    and estimate lines (default: megaedge's log at INFO)."""
    say = say or log.info
    recipe = options.chosen_recipe()
    items, source = calibration_items(options.calib)
    cache = Path(options.calib_cache).expanduser() if options.calib_cache else None
    if not quantize.calibrates(recipe) and (options.calib or cache):
        log.warning("recipe %s quantizes weights only: --calib / --calib-cache shape no part of the bundle (only "
                    "the report's naive per-tensor variant reads the clips); static recipes: --recipe cpu", recipe.name)
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    if not options.report:
        return quantize.quantize_bundle(fp32_bundle, out, recipe, items, options.target, cache, source)
    from megaedge import fixture

    all_items = read_set(options.eval_set or fixture.heldout_manifest())
    eval_items = spread(all_items, options.report_clips)
    clean = [it for it in items if it.get("scenario") == "clean"]
    extra = ["naive_per_tensor"] + (["clean_calibration"] if clean and "static" in (recipe.encoder, recipe.decoder)
                                    else []) if options.compare else []
    arms = ["fp32", "int8", *extra]
    subset = f" of {len(all_items)}" if len(eval_items) < len(all_items) else ""
    say(f"quantization report: {len(arms)} variants ({', '.join(arms)}) x {len(eval_items)}{subset} clips"
        + (f", after quantizing the {len(extra)} comparison variant{'s' if len(extra) > 1 else ''}" if extra else "")
        + "; bound it with --report-clips N, --no-compare or --no-report")
    # The bundle is quantized and reported on in a hidden folder beside ``out`` and renamed to ``out`` only with its
    # report listed in its manifest: an interrupted report leaves no folder that passes for a complete bundle.
    with tempfile.TemporaryDirectory(prefix=".megaedge-int8-", dir=out.parent) as tmp:
        work = Path(tmp) / "int8"
        info = quantize.quantize_bundle(fp32_bundle, work, recipe, items, options.target, cache, source)
        variants = {"int8": work}
        if "naive_per_tensor" in extra:
            naive = Path(tmp) / "naive"
            quantize.quantize_bundle(fp32_bundle, naive, quantize.RECIPES["naive"], items, options.target)
            variants["naive_per_tensor"] = naive
        if "clean_calibration" in extra:
            clean_out = Path(tmp) / "clean"
            quantize.quantize_bundle(fp32_bundle, clean_out, recipe, clean, options.target)
            variants["clean_calibration"] = clean_out
        report = compare(fp32_bundle, variants, eval_items, say=say)
        report["clips_in_set"] = len(all_items)
        report["recipe"] = info.quantization["recipe"]
        report["target"] = options.target
        report["calibration"] = {"clips": len(items), "source": source, "shapes_bundle": quantize.calibrates(recipe)}
        (work / manifest.QUANT_REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
        (work / manifest.QUANT_REPORT_MD).write_text(format_report(report) + "\n")
        # The report files are part of the bundle: list them with their hashes.
        doc = info.to_dict()
        for name in (manifest.QUANT_REPORT_JSON, manifest.QUANT_REPORT_MD):
            doc["files"][name] = manifest.sha256_file(work / name)
        info = manifest.Manifest.from_dict(doc)
        manifest.write(info, work)
        work.rename(out)
    return info


def _route_for(info: manifest.Manifest) -> str:
    """The route a user gets by default: the router decides when there is one, else the LoRA route."""
    return "lora" if info.routed and not info.router else "auto"


def _eta(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def compare(fp32_bundle: Path, variants: dict[str, Path | tuple[Path, dict]], items: list[dict],
            say: Callable[[str], None] | None = None, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Per group: WER of FP32 and each variant, the WER delta against FP32 with its paired-bootstrap 95 % interval,
    token agreement and encoder cosine vs FP32, loop/empty rates. A variant is a bundle, or (bundle,
    Transcriber.from_bundle options): one bundle run two ways is two variants. ``say`` gets an estimate of the
    time left once the first clips are timed and, without a progress bar, a progress line every tenth."""
    from megaedge.runtime.transcriber import Transcriber

    jiwer = __import__("jiwer")
    arms = {name: v if isinstance(v, tuple) else (v, {}) for name, v in {"fp32": fp32_bundle, **variants}.items()}
    bundles = {name: path for name, (path, _) in arms.items()}
    # No speech gate: the report measures what quantization changes, on every clip the decoder sees. The load-time
    # recipe advice is for the device a bundle runs on, not this machine, and the comparison arms (naive INT8) are
    # inaccurate by design: it stays quiet here.
    advice = logging.getLogger("megaedge.runtime.recipe_advice")
    level = advice.level
    advice.setLevel(logging.ERROR)
    try:
        trs = {name: Transcriber.from_bundle(path, verify=False, **{"vad": "off", **options})
               for name, (path, options) in arms.items()}
    finally:
        advice.setLevel(level)
    say = say or log.info
    rows = []
    start, step = time.perf_counter(), max(1, len(items) // 10)
    for done, item in enumerate(track(items, desc="quantization report", unit="clip")):
        elapsed = time.perf_counter() - start
        if done and (done == min(5, len(items) - 1) or (done % step == 0 and not progress_enabled())):
            say(f"quantization report: {done}/{len(items)} clips, ~{_eta(elapsed / done * (len(items) - done))} "
                f"left")
        samples = audio_io.load(item["path"])
        ref = normalize(item["text"])
        row = {"id": item.get("id"), "groups": group_keys(item), "ref": ref, "words": len((ref or "<empty>").split())}
        ref_enc = None
        for name, tr in trs.items():
            result = tr.transcribe(samples, route=_route_for(tr.manifest))
            gate = 1.0 if result.route in ("lora", "merged") else 0.0
            enc = tr.encode(samples, gate=gate).astype(np.float32)
            if name == "fp32":
                ref_enc = enc
            cos = float(np.sum(enc * ref_enc) / (np.linalg.norm(enc) * np.linalg.norm(ref_enc) + 1e-12))
            hyp = normalize(result.text)
            row[name] = {"hyp": hyp, "tokens": result.token_ids, "loop": result.loop_guard, "cosine": cos,
                         "errors": word_errors(ref or "<empty>", hyp)}
        rows.append(row)
    groups = sorted({g for r in rows for g in r["groups"]}, key=lambda k: (k != "all", k not in ("clean", "degraded"), k))
    table = {}
    for group in groups:
        sel = [r for r in rows if group in r["groups"]]
        refs = [r["ref"] or "<empty>" for r in sel]
        entry = {"clips": len(sel)}
        words = np.array([r["words"] for r in sel])
        base = np.array([r["fp32"]["errors"] for r in sel])
        for name in bundles:
            entry[f"wer_{name}"] = round(100 * jiwer.wer(refs, [r[name]["hyp"] for r in sel]), 2)
            entry[f"empty_{name}"] = round(100 * np.mean([not r[name]["hyp"] for r in sel]), 2)
            entry[f"loop_{name}"] = round(100 * np.mean([r[name]["loop"] for r in sel]), 2)
            if name != "fp32":
                entry[f"agree_{name}"] = round(token_agreement([r["fp32"]["tokens"] for r in sel],
                                                               [r[name]["tokens"] for r in sel]), 2)
                entry[f"cosine_{name}"] = round(float(np.mean([r[name]["cosine"] for r in sel])), 5)
                delta, low, high = paired_delta(base, np.array([r[name]["errors"] for r in sel]), words,
                                                resamples, seed)
                entry[f"delta_{name}"] = round(delta, 2)
                if len(sel) < MIN_CLIPS_FOR_INTERVAL:
                    entry[f"ci_{name}"] = entry[f"flag_{name}"] = entry[f"target_{name}"] = None
                    continue
                entry[f"ci_{name}"] = [round(low, 2), round(high, 2)]
                # Flagged only when the interval excludes zero: "worse" / "better" than FP32 beyond resampling.
                entry[f"flag_{name}"] = "worse" if low > 0 else "better" if high < 0 else None
                entry[f"target_{name}"] = bool(delta <= TARGET["max_delta"] and high <= TARGET["max_ci_high"]
                                               and entry[f"agree_{name}"] >= TARGET["min_agreement"])
        table[group] = entry
    sizes = {name: round(sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".onnx", ".data")) / 2**20, 2)
             for name, path in bundles.items()}
    return {"groups": table, "size_mib": sizes, "variants": list(bundles), "acceptance": TARGET,
            "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95,
                          "unit": "utterance, paired: both systems on the same resample; corpus WER = sum errors / "
                                  "sum reference words"}}


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
    head = ["group", "clips", "WER fp32"] + [f"WER {n}" for n in names] + [f"Δ {n} [95% CI]" for n in names]
    head += [f"agree {n}" for n in names] + [f"enc cos {primary}", f"loop % {primary}", f"empty % {primary}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mark = {"worse": " ▲", "better": " ▼", None: ""}
    for group, e in report["groups"].items():
        cells = [group, str(e["clips"]), f"{e['wer_fp32']:.2f}"] + [f"{e[f'wer_{n}']:.2f}" for n in names]
        cells += [(f"{e[f'delta_{n}']:+.2f} [{e[f'ci_{n}'][0]:+.2f}, {e[f'ci_{n}'][1]:+.2f}]{mark[e[f'flag_{n}']]}"
                   if e.get(f"ci_{n}") else f"{e[f'delta_{n}']:+.2f} (n < {MIN_CLIPS_FOR_INTERVAL})")
                  if f"delta_{n}" in e else "" for n in names]
        cells += [f"{e[f'agree_{n}']:.2f}" for n in names]
        cells += [f"{e[f'cosine_{primary}']:.4f}", f"{e[f'loop_{primary}']:.1f}", f"{e[f'empty_{primary}']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{k} {v:.1f} MiB" for k, v in report["size_mib"].items())
    text = "\n".join(lines) + f"\n\nGraph sizes: {sizes}."
    if "bootstrap" in report:
        target = report["acceptance"]
        missed = [g for g, e in report["groups"].items()
                  if g.startswith(("condition:", "clean", "all")) and e.get(f"target_{primary}", True) is False]
        text += (f"\n\nΔ = WER minus FP32's in points; 95 % interval from a paired bootstrap over utterances "
                 f"({report['bootstrap']['resamples']} resamples); ▲/▼ = the interval excludes zero (worse/better). "
                 f"Target per condition: Δ <= {target['max_delta']}, upper bound <= {target['max_ci_high']}, "
                 f"agreement >= {target['min_agreement']} %: "
                 + (f"missed by {', '.join(missed)}." if missed else f"met by {primary} in every condition."))
    return text


def export_int8(model_path, out_dir, export_options, int8_options: Int8Options,
                say: Callable[[str], None] | None = None, **kwargs) -> Path:
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
        int8_from_fp32(fp32, staging, int8_options, say)
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
