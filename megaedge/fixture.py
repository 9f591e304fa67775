"""Where the shipped trained fixture lives (see training/README.md): checkpoint, held-out clips, calibration clips.

The fixture is megaedge's embedded default model: `megaedge export` with no MODEL argument exports it.
"""

from __future__ import annotations

from pathlib import Path

from megaedge.errors import MegaedgeError

ROOT = Path(__file__).resolve().parent / "assets" / "fixture"
MODEL_DIR = ROOT / "model"
HELDOUT_DIR = ROOT / "heldout"
CALIBRATION_DIR = ROOT / "calibration"
MANIFEST_NAME = "manifest.jsonl"


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise MegaedgeError(f"{path}: the shipped {what} is missing from this installation; reinstall megaedge")
    return path


def model_dir() -> Path:
    return _existing(MODEL_DIR, "fixture checkpoint")


def heldout_manifest() -> Path:
    return _existing(HELDOUT_DIR / MANIFEST_NAME, "held-out clip set")


def calibration_manifest() -> Path:
    return _existing(CALIBRATION_DIR / MANIFEST_NAME, "calibration clip set")
