"""Calibration / evaluation set builder: clean speech in, degraded 16 kHz wav files and a JSONL manifest out.

Each output item k draws everything from a generator seeded by (seed, k), so the same seed gives identical bytes
whatever the order or subset of work, and different seeds differ.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megaedge.calibration import scenarios
from megaedge.calibration.conditions import ATOMIC
from megaedge.errors import AudioError, MegaedgeError, NonFiniteAudioError
from megaedge.progress import track
from megaedge.runtime import audio as audio_io

log = logging.getLogger("megaedge.calibration")
SAMPLE_RATE = audio_io.TARGET_RATE
MANIFEST_NAME = "manifest.jsonl"
CLIPS_DIR = "clips"


@dataclass(frozen=True)
class BuildOptions:
    per_condition: int = 8
    scenarios: tuple[str, ...] = ()  # scenario names; empty means none
    per_scenario: int = 1
    severity: tuple[float, float] = (0.3, 0.9)
    seed: int = 0
    clean: int = 8  # clean copies (condition "clean"): routers and reports need the clean side too
    max_seconds: float = 30.0  # longer sources are cut: calibration needs variety, not hours

    @classmethod
    def preset(cls, name: str) -> BuildOptions:
        presets = {
            "calibration": cls(per_condition=8, scenarios=tuple(scenarios.SCENARIOS), per_scenario=1, clean=8),
            "eval": cls(per_condition=20, scenarios=tuple(scenarios.SCENARIOS), per_scenario=2, clean=40,
                        severity=(0.5, 0.9)),
            "smoke": cls(per_condition=1, scenarios=("factory_floor",), per_scenario=1, clean=1),
        }
        if name not in presets:
            raise MegaedgeError(f"preset {name!r} is not one of {sorted(presets)}")
        return presets[name]

    def validated(self) -> BuildOptions:
        lo, hi = self.severity
        if not (0.0 <= lo <= hi <= 1.0):
            raise MegaedgeError(f"severity range {lo}:{hi} must satisfy 0 <= LO <= HI <= 1 (e.g. --severity 0.3:0.9)")
        for name in self.scenarios:
            scenarios.get(name)
        if min(self.per_condition, self.per_scenario, self.clean) < 0:
            raise MegaedgeError("counts must be >= 0")
        return self


@dataclass(frozen=True)
class SpeechSource:
    path: Path
    text: str | None = None


@dataclass
class SourceScan:
    sources: list[SpeechSource]
    skipped: list[str] = field(default_factory=list)


_AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au", ".opus"}


def scan_speech(location: str | Path) -> SourceScan:
    """Speech sources from a folder (recursively; a same-stem .txt holds the reference text) or a JSONL file
    ({"path": ..., "text": ...} per line, paths relative to the file)."""
    loc = Path(location)
    if not loc.exists():
        raise MegaedgeError(f"{loc}: no such folder or JSONL file")
    found: list[SpeechSource] = []
    skipped: list[str] = []
    if loc.is_file():
        for number, line in enumerate(loc.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                path = Path(item.get("path") or item["audio"])
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise MegaedgeError(f"{loc}:{number}: expected a JSON object with 'path' (and optional 'text')") from exc
            found.append(SpeechSource(path if path.is_absolute() else loc.parent / path, item.get("text")))
    else:
        for path in sorted(p for p in loc.rglob("*") if p.is_file()):
            if path.suffix.lower() == ".txt" and any(path.with_suffix(s).exists() for s in _AUDIO_SUFFIXES):
                continue
            if path.suffix.lower() not in _AUDIO_SUFFIXES:
                skipped.append(str(path))
                continue
            sidecar = path.with_suffix(".txt")
            text = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
            found.append(SpeechSource(path, text))
    if not found and not skipped:
        raise MegaedgeError(f"{loc}: no audio files found (expected wav/flac/ogg/mp3 files or a JSONL list)")
    return SourceScan(found, skipped)


def load_sources(scan: SourceScan, max_seconds: float) -> list[tuple[SpeechSource, np.ndarray]]:
    """Read every source; unreadable files are skipped and counted, NaN/Inf audio is rejected by name."""
    loaded = []
    skipped = list(scan.skipped)
    for source in scan.sources:
        try:
            samples = audio_io.read_file(source.path, SAMPLE_RATE)
        except NonFiniteAudioError:
            raise
        except AudioError:
            skipped.append(str(source.path))
            continue
        loaded.append((source, samples[: int(max_seconds * SAMPLE_RATE)]))
    if skipped:
        log.warning("skipped %d files that are not readable audio, e.g. %s", len(skipped), skipped[:3])
    if not loaded:
        raise MegaedgeError(f"no usable speech: all {len(skipped)} files were unreadable or not audio")
    return loaded


@dataclass(frozen=True)
class Job:
    index: int
    kind: str  # "clean", "condition" or "scenario"
    name: str


def plan(options: BuildOptions) -> list[Job]:
    jobs = [("clean", "clean")] * options.clean
    for condition in ATOMIC:
        jobs += [("condition", condition)] * options.per_condition
    for name in options.scenarios:
        jobs += [("scenario", name)] * options.per_scenario
    return [Job(i, kind, name) for i, (kind, name) in enumerate(jobs)]


def render(job: Job, sources, options: BuildOptions) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng([options.seed, job.index])
    source, clean = sources[int(rng.integers(len(sources)))]
    lo, hi = options.severity
    severity = 0.0 if job.kind == "clean" else float(rng.uniform(lo, hi))
    sub_seed = int(rng.integers(2**31))
    info: dict = {}
    if job.kind == "clean":
        out = clean.astype(np.float32)
    elif job.kind == "condition":
        out = scenarios.apply_atomic(job.name, clean, SAMPLE_RATE, severity, sub_seed, info)
    else:
        out = scenarios.apply(job.name, clean, SAMPLE_RATE, severity, sub_seed, info)
    record = {
        "source": str(source.path),
        "condition": job.name if job.kind != "scenario" else None,
        "scenario": job.name if job.kind == "scenario" else None,
        "severity": round(severity, 4),
        "params": info,
        "text": source.text,
        "duration": round(out.size / SAMPLE_RATE, 3),
    }
    return out, record


def build(speech: str | Path, out_dir: str | Path, options: BuildOptions, force: bool = False) -> Path:
    """Write clips/ and manifest.jsonl under ``out_dir``; returns the manifest path."""
    import soundfile as sf

    options = options.validated()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise MegaedgeError(f"{out}: output directory is not empty; pass --force to overwrite")
    sources = load_sources(scan_speech(speech), options.max_seconds)
    (out / CLIPS_DIR).mkdir(parents=True, exist_ok=True)
    jobs = plan(options)
    manifest = out / MANIFEST_NAME
    with manifest.open("w", encoding="utf-8") as handle:
        for job in track(jobs, desc="simulating", total=len(jobs), unit="clip"):
            samples, record = render(job, sources, options)
            rel = f"{CLIPS_DIR}/{job.index:05d}_{job.name.replace('+', '-')}.wav"
            sf.write(out / rel, samples, SAMPLE_RATE, subtype="PCM_16")
            handle.write(json.dumps({"path": rel, **record}, ensure_ascii=False, sort_keys=True) + "\n")
    log.info("wrote %d clips to %s", len(jobs), out)
    return manifest


def read_manifest(path: str | Path) -> Iterator[dict]:
    """Items of a manifest with ``path`` resolved against the manifest's folder."""
    manifest = Path(path)
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            item["path"] = str((manifest.parent / item["path"]).resolve())
            yield item


def preview(speech: str | Path, png: str | Path, seed: int = 0, severity: float = 0.7, seconds: float = 4.0) -> Path:
    """One PNG: log-mel spectrograms of one clip, clean and under each atomic condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megaedge.runtime.features import router_log_mel

    source, clean = load_sources(scan_speech(speech), seconds)[0]
    panels = [("clean", clean, {})]
    for condition in ATOMIC:
        info: dict = {}
        panels.append((condition, scenarios.apply_atomic(condition, clean, SAMPLE_RATE, severity, seed, info), info))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.0 * len(panels)), sharex=True)
    for ax, (name, samples, info) in zip(axes, panels):
        ax.imshow(router_log_mel(samples), origin="lower", aspect="auto", cmap="magma", vmin=-1.5, vmax=1.5,
                  extent=(0, samples.size / SAMPLE_RATE, 0, 80))
        detail = ", ".join(f"{k}={v}" for k, v in info.items() if isinstance(v, (int, float, str)))[:110]
        ax.set_title(f"{name} (severity {severity if name != 'clean' else 0}) {detail}", fontsize=8, loc="left")
        ax.set_ylabel("mel bin")
    axes[-1].set_xlabel(f"seconds ({source.path.name})")
    fig.tight_layout()
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
