"""Fixtures and helpers of the CLI tests."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REPO

CLI = "import sys\nfrom megaedge.cli.main import main\nsys.exit(main(sys.argv[1:]))"


def run_with_stdin(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", CLI, *args], input=stdin, capture_output=True, cwd=REPO,
                          timeout=600)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


@pytest.fixture(scope="session")
def clip(tmp_path_factory):
    """A held-out command with a second of silence after it (16-bit, 16 kHz), as a file and as its samples."""
    from megaedge import fixture
    from megaedge.runtime.evaluate import read_set

    samples, rate = sf.read(read_set(fixture.heldout_manifest())[0]["path"], dtype="int16")
    samples = np.concatenate([samples, np.zeros(rate, np.int16)])
    path = tmp_path_factory.mktemp("stdin") / "clip.wav"
    sf.write(str(path), samples, rate, subtype="PCM_16")
    return path, samples, rate
