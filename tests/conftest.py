"""Shared fixtures: tiny random-weight checkpoints in every layout (built once per session) and audio helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MEGAEDGE_NO_PROGRESS", "1")
# The parity grid compares decoders on synthetic signals that are not speech, which the voice-activity gate would
# (rightly) silence: transcribers load without it unless a test asks (tests/runtime/test_speech_gate.py does).
os.environ.setdefault("MEGAEDGE_VAD", "off")
# `megaedge prepare` keeps a sealing key per user (runtime/prepared.py): the tests' own, not the user's.
if "MEGAEDGE_STATE_DIR" not in os.environ:  # made here, so removed here (subprocesses inherit it meanwhile)
    _STATE_DIR = tempfile.TemporaryDirectory(prefix="megaedge-test-state-")
    os.environ["MEGAEDGE_STATE_DIR"] = _STATE_DIR.name
REPO = Path(__file__).resolve().parents[1]


def speechlike(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """Deterministic non-stationary test signal (the benchmarks' speech-like audio)."""
    from megaedge.runtime.bench import speech_like_audio

    return speech_like_audio(seconds, seed, rate)


def forget_flac_length(path: Path) -> Path:
    """Make the FLAC at ``path`` one a streaming encoder writes (``arecord | flac -``): STREAMINFO's total samples
    0, "unknown"; the audio frames stay as they are."""
    raw = bytearray(Path(path).read_bytes())
    fields = int.from_bytes(raw[18:26], "big")  # STREAMINFO: rate, channels, bits, then 36 bits of total samples
    raw[18:26] = (fields & ~((1 << 36) - 1)).to_bytes(8, "big")
    Path(path).write_bytes(bytes(raw))
    return Path(path)


def heldout_clips(clean: int, degraded: int) -> list[dict]:
    """The first ``clean`` clean and ``degraded`` degraded clips of the fixture's held-out set (manifest items)."""
    from megaedge import fixture
    from megaedge.runtime.evaluate import read_set

    items = read_set(fixture.heldout_manifest())
    return ([it for it in items if it["scenario"] == "clean"][:clean]
            + [it for it in items if it["scenario"] != "clean"][:degraded])


def native_and_onnxruntime(bundle: Path):
    """Two Transcribers of ``bundle``: one decoding natively (prompt too), one in onnxruntime's decoder graphs."""
    from megaedge.runtime.transcriber import Transcriber

    native = Transcriber.from_bundle(bundle, decode="native")
    ort = Transcriber.from_bundle(bundle, decode="ort")
    assert native.native is not None and native.native_prefill and ort.native is None
    return native, ort


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{'mega': root, 'original': dir, 'native': dir} with the SAME random weights (same seed)."""
    from megaedge.export.factory import write_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {name: write_checkpoint(root / name, "tiny", name, seed=0) for name in ("mega", "original", "native")}


@pytest.fixture(scope="session")
def tiny_mega(tiny_checkpoints):
    return tiny_checkpoints["mega"]


@pytest.fixture(scope="session")
def tiny_bundles(tiny_mega, tmp_path_factory):
    from megaedge.export.bundle import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("bundles")
    return {mode: export_bundle(tiny_mega, root / mode, ExportOptions(mode=mode)) for mode in ("merged", "routed")}


@pytest.fixture(scope="session")
def tiny_loaded(tiny_mega):
    from megaedge.export.loader import load_checkpoint

    return load_checkpoint(tiny_mega, lora="branches")


@pytest.fixture(scope="session")
def transcribers(tiny_bundles):
    from megaedge.runtime.transcriber import Transcriber

    return {mode: Transcriber.from_bundle(path) for mode, path in tiny_bundles.items()}


@pytest.fixture(scope="session")
def fixture_bundles(tmp_path_factory):
    """FP32 merged and routed bundles of the shipped trained fixture (exported once per session)."""
    from megaedge import fixture
    from megaedge.export.bundle import ExportOptions, export_bundle

    if not fixture.MODEL_DIR.exists():
        pytest.skip("fixture not shipped in this checkout")
    root = tmp_path_factory.mktemp("fixture_bundles")
    return {mode: export_bundle(fixture.model_dir(), root / mode, ExportOptions(mode=mode))
            for mode in ("merged", "routed")}


def int8_bundle_from(fp32_bundle: Path, root: Path, recipe: str = "cpu", **changes) -> Path:
    """An INT8 bundle of ``fp32_bundle`` at ``root / 'int8'``, calibrated on two short speech-like clips;
    ``changes``: recipe fields replaced (e.g. block_size=32)."""
    import dataclasses

    import soundfile as sf

    from megaedge.export import quantize

    items = []
    for i in range(2):
        path = root / f"c{i}.wav"
        sf.write(str(path), speechlike(2.0 + i, seed=i), 16000)
        items.append({"path": str(path), "text": "", "scenario": "clean"})
    out = root / "int8"
    quantize.quantize_bundle(fp32_bundle, out, dataclasses.replace(quantize.RECIPES[recipe], **changes), items, recipe)
    return out


def run_cli(*args: str, env: dict | None = None, python_prelude: str = "") -> subprocess.CompletedProcess:
    """Run ``python -m megaedge ARGS`` (optionally after a prelude, e.g. making torch unimportable)."""
    code = f"{python_prelude}\nimport sys\nfrom megaedge.cli.main import main\nsys.exit(main(sys.argv[1:]))"
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env, cwd=REPO)


BLOCK_TORCH = (
    "import sys\n"
    "for name in ('torch', 'transformers', 'peft', 'torchaudio'):\n"
    "    sys.modules[name] = None  # any import of these now raises ImportError\n"
)
