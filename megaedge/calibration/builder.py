"""Calibration / evaluation set builder: clean speech in, degraded 16 kHz wav files and a JSONL manifest out.

Each output item k draws everything from a generator seeded by (seed, k), so the same seed gives identical bytes
whatever the order or subset of work, and different seeds differ. A finished set records its cache key (options,
speech, code version) in set.json: building the same set into the same folder again reuses it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
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
SET_INFO = "set.json"  # cache key and where the speech came from


@dataclass(frozen=True)
class BuildOptions:
    per_condition: int = 8
    scenarios: tuple[str, ...] = ()  # scenario names; empty means none
    per_scenario: int = 1
    severity: tuple[float, float] = (0.3, 0.9)
    seed: int = 0
    clean: int = 8  # clean copies (condition "clean"): routers and reports need the clean side too
    max_seconds: float = 30.0  # longer sources are cut: calibration needs variety, not hours
    # Fixed severities the degraded clips of each condition / scenario cycle through (empty: uniform in
    # ``severity``): an evaluation set then has every severity equally often in every group.
    severity_levels: tuple[float, ...] = ()

    @classmethod
    def preset(cls, name: str) -> BuildOptions:
        presets = {
            "calibration": cls(per_condition=8, scenarios=tuple(scenarios.SCENARIOS), per_scenario=1, clean=8),
            # ~150 utterances per atomic condition resolve a WER delta of half a point (docs/int8.md); the 54
            # scenarios once each are read together ("degraded"), not one by one.
            "eval": cls(per_condition=150, scenarios=tuple(scenarios.SCENARIOS), per_scenario=1, clean=150,
                        severity=(0.3, 0.9), severity_levels=(0.3, 0.5, 0.7, 0.9)),
            "smoke": cls(per_condition=1, scenarios=("factory_floor",), per_scenario=1, clean=1),
        }
        if name not in presets:
            raise MegaedgeError(f"preset {name!r} is not one of {sorted(presets)}")
        return presets[name]

    def validated(self) -> BuildOptions:
        lo, hi = self.severity
        if not (0.0 <= lo <= hi <= 1.0):
            raise MegaedgeError(f"severity range {lo}:{hi} must satisfy 0 <= LO <= HI <= 1 (e.g. --severity 0.3:0.9)")
        if not all(0.0 <= level <= 1.0 for level in self.severity_levels):
            raise MegaedgeError(f"severity levels {self.severity_levels} must lie within 0..1")
        for name in self.scenarios:
            scenarios.get(name)
        if min(self.per_condition, self.per_scenario, self.clean) < 0:
            raise MegaedgeError("counts must be >= 0")
        return self


@dataclass(frozen=True)
class SpeechSource:
    path: Path
    text: str | None = None
    voice: str | None = None
    origin: str | None = None  # recorded on every clip when the speech is not the user's (e.g. a fallback)


@dataclass(frozen=True)
class SpeechSet:
    """Where a set's clean speech comes from: a description, a digest of everything that decides its samples (part
    of the cache key, known before any audio is loaded or synthesized), the loader, and the input paths that
    --force must never replace."""

    description: str
    digest: str
    load: Callable[[float], list]  # max_seconds -> [(SpeechSource, samples)]
    inputs: tuple[Path, ...] = ()


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


def speech_set(location: str | Path) -> SpeechSet:
    """The user's speech (folder or JSONL list); its digest covers every file's bytes and text."""
    scan = scan_speech(location)
    digest = hashlib.sha256()
    for source in scan.sources:
        digest.update(f"{source.path.name}\0{source.text}\0".encode())
        try:
            digest.update(hashlib.sha256(source.path.read_bytes()).digest())
        except OSError:
            digest.update(b"unreadable")  # load_sources skips it and says so
    return SpeechSet(str(location), digest.hexdigest(), lambda seconds: load_sources(scan, seconds),
                     (Path(location), *(s.path for s in scan.sources)))


def code_version() -> str:
    """megaedge's version and the simulator's own source: a changed condition makes a cached set stale."""
    import megaedge

    digest = hashlib.sha256(megaedge.__version__.encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def set_key(speech: SpeechSet, options: BuildOptions) -> str:
    doc = {"options": asdict(options), "speech": speech.digest, "code": code_version()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def reusable(out: str | Path, key: str) -> bool:
    """A complete set with this cache key is already in ``out``: its set.json says so and every clip is there."""
    out = Path(out)
    try:
        info = json.loads((out / SET_INFO).read_text(encoding="utf-8"))
        rows = [json.loads(line) for line in (out / MANIFEST_NAME).read_text(encoding="utf-8").splitlines() if line]
    except (OSError, ValueError):
        return False
    return info.get("key") == key and len(rows) == info.get("clips") and all((out / r["path"]).is_file()
                                                                             for r in rows)


def default_out(key: str) -> Path:
    """Where a set built without --out is cached: ``$MEGAEDGE_CACHE/sets/KEY`` (default ~/.cache/megaedge)."""
    root = os.environ.get("MEGAEDGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "megaedge"
    return Path(root) / "sets" / key[:16]


@dataclass(frozen=True)
class Job:
    index: int
    kind: str  # "clean", "condition" or "scenario"
    name: str
    rank: int = 0  # position among the jobs of the same name (picks the severity level)


def plan(options: BuildOptions) -> list[Job]:
    jobs = [("clean", "clean", i) for i in range(options.clean)]
    for condition in ATOMIC:
        jobs += [("condition", condition, i) for i in range(options.per_condition)]
    for name in options.scenarios:
        jobs += [("scenario", name, i) for i in range(options.per_scenario)]
    return [Job(i, kind, name, rank) for i, (kind, name, rank) in enumerate(jobs)]


def render(job: Job, sources, options: BuildOptions) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng([options.seed, job.index])
    source, clean = sources[int(rng.integers(len(sources)))]
    lo, hi = options.severity
    severity = 0.0 if job.kind == "clean" else float(rng.uniform(lo, hi))
    if options.severity_levels and job.kind != "clean":
        severity = options.severity_levels[job.rank % len(options.severity_levels)]
    sub_seed = int(rng.integers(2**31))
    info: dict = {}
    if job.kind == "clean":
        out = clean.astype(np.float32)
    elif job.kind == "condition":
        out = scenarios.apply_atomic(job.name, clean, SAMPLE_RATE, severity, sub_seed, info)
    else:
        out = scenarios.apply(job.name, clean, SAMPLE_RATE, severity, sub_seed, info)
    steps = [] if job.kind == "clean" else [job.name] if job.kind == "condition" else list(scenarios.get(job.name).steps)
    record = {
        "source": str(source.path),
        "condition": job.name if job.kind != "scenario" else None,
        # scenario and conditions as the fixture's held-out manifest has them: the reports group clips by both
        "scenario": job.name,
        "conditions": steps,
        "severity": round(severity, 4),
        "params": info,
        "text": source.text,
        "duration": round(out.size / SAMPLE_RATE, 3),
    }
    record.update({k: v for k, v in (("voice", source.voice), ("origin", source.origin)) if v})
    return out, record


# An existing --out keeps everything but clips/ and manifest.jsonl; the new set is staged in this hidden folder
# inside it (same filesystem, so the final renames are atomic).
STAGING_NAME = "calibrate"
_CLIP_NAME = re.compile(r"^\d{5}_[A-Za-z0-9_.-]+\.wav$")  # what build() names its clips


def _check_existing(out: Path, force: bool, inputs: list[Path]) -> None:
    """One line for an existing --out that must not be written: not empty without --force, or (with --force) a
    clips/ folder or manifest that build() did not write or that holds the speech being simulated."""
    try:
        entries = list(out.iterdir())
    except OSError as exc:
        from megaedge import staging

        raise staging.not_writable(out, exc) from exc
    if not entries:
        return
    if not force:
        raise MegaedgeError(f"{out}: output directory is not empty; pass --force to overwrite its clips/ and "
                            f"{MANIFEST_NAME}, or choose a new folder")
    clips, manifest = out / CLIPS_DIR, out / MANIFEST_NAME
    for source in inputs:
        real = source.resolve()
        if real == out.resolve() or real == manifest.resolve() or clips.resolve() in real.parents:
            raise MegaedgeError(f"--out {out}: --force would replace the speech being simulated ({source}); "
                                f"choose another --out")
    if os.path.lexists(manifest) and not manifest.is_file():
        raise MegaedgeError(f"{manifest}: is not a file; --force only replaces a calibration manifest; "
                            f"choose another --out")
    if os.path.lexists(clips):
        if clips.is_symlink() or not clips.is_dir():
            raise MegaedgeError(f"{clips}: is not a folder of clips; --force only replaces a calibration set's "
                                f"clips/; choose another --out")
        foreign = sorted(p.name for p in clips.iterdir() if not (_CLIP_NAME.match(p.name) and p.is_file()))
        if foreign:
            raise MegaedgeError(f"{clips}: holds {foreign[0]!r}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}"
                                f", which megaedge calibrate did not write; --force only replaces a calibration "
                                f"set's clips/; choose another --out")


def _commit(work: Path, out: Path) -> None:
    """Move the finished set from ``work`` to ``out``; the manifest arrives last, so a set without its manifest is
    the only thing an interruption can leave, and such a set does not look complete."""
    from megaedge import staging

    with staging.signals_held():
        if not out.is_dir():
            os.rename(work, out)  # a new folder: one atomic rename
            return
        # An existing folder: the old manifest goes first and the new one comes last. The old pieces wait in
        # ``work`` and go with it; a crash here leaves ``work`` to the next run's stale-folder clearing.
        for name in (MANIFEST_NAME, SET_INFO, CLIPS_DIR):
            if os.path.lexists(out / name):
                os.rename(out / name, work / ("old-" + name))
        for name in (CLIPS_DIR, SET_INFO, MANIFEST_NAME):
            os.rename(work / name, out / name)


def _folder_or_nothing(out: Path) -> None:
    if os.path.lexists(out) and not out.is_dir():
        raise MegaedgeError(f"--out {out}: exists and is not a folder; choose a folder for the calibration set")


def check_out(out_dir: str | Path, speech: SpeechSet, force: bool = False) -> None:
    """What ``build`` refuses about an existing ``out_dir``, checked before anything is announced or simulated."""
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    _folder_or_nothing(out)
    if out.is_dir():
        _check_existing(out, force, list(speech.inputs))


def build(speech: str | Path | SpeechSet, out_dir: str | Path, options: BuildOptions, force: bool = False) -> Path:
    """Write clips/ and manifest.jsonl under ``out_dir``; returns the manifest path. A complete set of the same
    cache key (options, speech, code version; see set.json) already in ``out_dir`` is reused as it is.

    The set is simulated in a hidden staging folder and moved in when complete: an interrupted or failed run (Ctrl-C,
    SIGTERM, a full disk) leaves ``out_dir`` as it was, never a partial set with a valid-looking manifest. With
    ``force`` an existing set's clips/ and manifest are replaced and nothing else in the folder is touched.
    """
    import soundfile as sf

    from megaedge import staging

    options = options.validated()
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    _folder_or_nothing(out)
    source_set = speech if isinstance(speech, SpeechSet) else speech_set(speech)
    key = set_key(source_set, options)
    # Leftovers of runs that died (SIGKILL, power loss): beside a new folder, or inside an existing one.
    staging.clear_stale(out.parent, out.name)
    if out.is_dir():
        staging.clear_stale(out, STAGING_NAME)
        if reusable(out, key):
            log.info("%s: reusing the set built with the same options, speech and code", out)
            return out / MANIFEST_NAME
        _check_existing(out, force, list(source_set.inputs))
    sources = source_set.load(options.max_seconds)
    jobs = plan(options)
    work = staging.make_staging(out, STAGING_NAME) if out.is_dir() else staging.make_staging(out.parent, out.name)
    try:
        (work / CLIPS_DIR).mkdir()
        lines = []
        for job in track(jobs, desc="simulating", total=len(jobs), unit="clip"):
            samples, record = render(job, sources, options)
            rel = f"{CLIPS_DIR}/{job.index:05d}_{job.name.replace('+', '-')}.wav"
            sf.write(work / rel, samples, SAMPLE_RATE, subtype="PCM_16")
            lines.append(json.dumps({"path": rel, **record}, ensure_ascii=False, sort_keys=True) + "\n")
        info = {"key": key, "clips": len(lines), "speech": source_set.description, "code": code_version(),
                "options": asdict(options)}
        (work / SET_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        (work / MANIFEST_NAME).write_text("".join(lines), encoding="utf-8")
        _commit(work, out)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
            raise staging.not_writable(out, exc) from exc
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another process filled a new --out meanwhile
            raise MegaedgeError(f"--out {out}: was created by someone else during the run; nothing was written; "
                                f"run again") from exc
        raise
    except getattr(sf, "LibsndfileError", RuntimeError) as exc:  # libsndfile reports a full disk its own way
        raise MegaedgeError(f"--out {out}: a clip could not be written ({exc}); nothing was left behind; check "
                            f"the free space and choose another --out if needed") from exc
    finally:
        # Ctrl-C, SIGTERM (megaedge.cli.signals), errors: the unfinished set goes; after success only old pieces.
        shutil.rmtree(work, ignore_errors=True)
    log.info("wrote %d clips to %s", len(jobs), out)
    return out / MANIFEST_NAME


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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=80)
    except OSError as exc:
        from megaedge import staging

        raise staging.not_writable(out.parent, exc, "--preview") from exc
    finally:
        plt.close(fig)
    return out
