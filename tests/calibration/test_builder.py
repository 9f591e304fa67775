import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from megaedge.calibration import builder, scenarios
from megaedge.errors import AudioError, MegaedgeError
from tests.conftest import REPO, run_cli, speechlike


@pytest.fixture()
def speech_dir(tmp_path):
    folder = tmp_path / "speech"
    folder.mkdir()
    for i in range(3):
        sf.write(folder / f"utt{i}.wav", speechlike(2.0 + i, seed=i), 16000)
        (folder / f"utt{i}.txt").write_text(f"open valve {i}")
    sf.write(folder / "stereo48k.flac", np.stack([speechlike(2.0)] * 2, 1), 16000)
    return folder


def test_registry_has_54_physically_ordered_scenarios():
    assert len(scenarios.SCENARIOS) >= 54
    for scenario in scenarios.SCENARIOS.values():
        stages = [scenarios.STAGE[s] for s in scenario.steps]
        assert stages == sorted(stages) and len(set(stages)) == len(stages), scenario.name
    with pytest.raises(MegaedgeError, match="unknown scenario 'nope'; valid: .*factory_floor"):
        scenarios.get("nope")


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "clips").iterdir())}


def test_build_is_reproducible_and_seed_sensitive(speech_dir, tmp_path):
    options = builder.BuildOptions(per_condition=1, scenarios=("factory_floor", "noise+dropout"), clean=1, seed=3)
    builder.build(speech_dir, tmp_path / "a", options)
    builder.build(speech_dir, tmp_path / "b", options)
    builder.build(speech_dir, tmp_path / "c", builder.BuildOptions(**{**options.__dict__, "seed": 4}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.jsonl").read_bytes() == (tmp_path / "b" / "manifest.jsonl").read_bytes()
    differing = sum(x != y for x, y in zip(_digest(tmp_path / "a").values(), _digest(tmp_path / "c").values()))
    assert differing >= 8
    items = list(builder.read_manifest(tmp_path / "a" / "manifest.jsonl"))
    assert len(items) == 1 + 7 + 2
    assert {i["condition"] for i in items if i["condition"]} == {"clean", *builder.ATOMIC}
    noise = next(i for i in items if i["condition"] == "noise")
    assert "snr_db" in noise["params"] and noise["text"].startswith("open valve") or noise["text"] is None
    dropout = next(i for i in items if i["condition"] == "dropout")
    assert "drop_fraction" in dropout["params"]
    scenario = next(i for i in items if i["scenario"] == "factory_floor")
    assert [s["condition"] for s in scenario["params"]["stages"]] == ["far_field", "noise", "recording", "distortion"]
    for item in items:
        data, rate = sf.read(item["path"])
        assert rate == 16000 and np.isfinite(data).all() and np.abs(data).max() <= 1.0


def test_jsonl_sources_and_preview(speech_dir, tmp_path):
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(json.dumps({"path": f"speech/utt{i}.wav", "text": f"t{i}"}) for i in range(2)))
    manifest = builder.build(listing, tmp_path / "out", builder.BuildOptions.preset("smoke"))
    assert all(item["text"] in ("t0", "t1") for item in builder.read_manifest(manifest))
    png = builder.preview(listing, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000


def test_bad_inputs(tmp_path, speech_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MegaedgeError, match="no audio files found"):
        builder.build(empty, tmp_path / "o1", builder.BuildOptions.preset("smoke"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.wav").write_text("not audio")
    (junk / "b.csv").write_text("x")
    with pytest.raises(MegaedgeError, match="no usable speech: all 2 files"):
        builder.build(junk, tmp_path / "o2", builder.BuildOptions.preset("smoke"))
    (speech_dir / "broken.wav").write_text("not audio")  # skipped with a warning, the rest is used
    builder.build(speech_dir, tmp_path / "o3", builder.BuildOptions.preset("smoke"))
    bad = np.zeros(16000, dtype=np.float32)
    bad[100] = np.nan
    sf.write(speech_dir / "nan.wav", bad, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav: 1 samples are NaN or Inf"):
        builder.build(speech_dir, tmp_path / "o4", builder.BuildOptions.preset("smoke"))
    with pytest.raises(MegaedgeError, match="severity range 0.5:1.2"):
        builder.BuildOptions(severity=(0.5, 1.2)).validated()
    with pytest.raises(MegaedgeError, match="not empty"):
        builder.build(speech_dir, tmp_path / "o3", builder.BuildOptions.preset("smoke"))


def test_cli_errors_are_one_line(tmp_path, speech_dir):
    result = run_cli("calibrate", "--speech", str(speech_dir), "--out", str(tmp_path / "o"), "--scenarios", "bogus")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "unknown scenario 'bogus'" in result.stderr
    result = run_cli("calibrate", "--speech", str(speech_dir), "--out", str(tmp_path / "o"), "--severity", "0.2:1.4")
    assert result.returncode == 1 and "0 <= LO <= HI <= 1" in result.stderr
    ok = run_cli("--no-progress", "calibrate", "--speech", str(speech_dir), "--out", str(tmp_path / "o"),
                 "--preset", "smoke")
    assert ok.returncode == 0 and "wrote 9 clips" in ok.stdout
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("x")
    refused = run_cli("calibrate", "--speech", str(speech_dir), "--out", str(taken), "--preset", "smoke")
    assert refused.returncode == 1 and "not empty" in refused.stderr
    assert "simulating" not in refused.stderr  # refused before it said it would simulate


# --------------------------------------------------------------------------- data safety (issue 28)
def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _interrupt_at(monkeypatch, index, exc=KeyboardInterrupt):
    """Make the simulation of job ``index`` raise, as Ctrl-C / SIGTERM (megaedge.cli.signals) would mid-run."""
    real = builder.render

    def render(job, sources, options):
        if job.index == index:
            raise exc()
        return real(job, sources, options)

    monkeypatch.setattr(builder, "render", render)


def test_interrupted_build_leaves_nothing_and_a_rerun_works(speech_dir, tmp_path, monkeypatch):
    options = builder.BuildOptions(per_condition=1, scenarios=(), clean=1)
    _interrupt_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        builder.build(speech_dir, tmp_path / "set", options)
    assert not (tmp_path / "set").exists()  # no folder, so no set that looks complete
    assert _hidden(tmp_path) == []  # and no staging folder left behind
    monkeypatch.undo()
    manifest = builder.build(speech_dir, tmp_path / "set", options)
    assert len(list(builder.read_manifest(manifest))) == 8
    assert len(list((tmp_path / "set" / "clips").iterdir())) == 8 and _hidden(tmp_path / "set") == []


def test_interrupted_force_rebuild_keeps_the_old_set(speech_dir, tmp_path, monkeypatch):
    out = tmp_path / "set"
    builder.build(speech_dir, out, builder.BuildOptions(per_condition=1, scenarios=(), clean=1, seed=1))
    before = (out / "manifest.jsonl").read_bytes(), _digest(out)
    _interrupt_at(monkeypatch, 3, OSError)
    with pytest.raises(OSError):
        builder.build(speech_dir, out, builder.BuildOptions(per_condition=1, scenarios=(), clean=1, seed=2), force=True)
    assert ((out / "manifest.jsonl").read_bytes(), _digest(out)) == before
    assert _hidden(out) == [] and _hidden(tmp_path) == []


def test_force_replaces_only_the_set(speech_dir, tmp_path):
    out = tmp_path / "set"
    builder.build(speech_dir, out, builder.BuildOptions(per_condition=2, scenarios=(), clean=1, seed=1))
    (out / "notes.txt").write_text("mine")
    (out / "clips" / "00099_stale.wav").write_bytes(b"")  # a clip of an older, bigger set: replaced with clips/
    builder.build(speech_dir, out, builder.BuildOptions(per_condition=1, scenarios=(), clean=1, seed=2), force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["clips", "manifest.jsonl", "notes.txt", "set.json"]
    items = list(builder.read_manifest(out / "manifest.jsonl"))
    assert len(items) == 8 and sorted(Path(i["path"]).name for i in items) == sorted(_digest(out))


def test_force_refuses_what_calibrate_did_not_write(speech_dir, tmp_path):
    options = builder.BuildOptions.preset("smoke")
    mine = tmp_path / "mine"
    (mine / "clips").mkdir(parents=True)
    (mine / "clips" / "interview.wav").write_bytes(b"x")
    with pytest.raises(MegaedgeError, match=r"clips: holds 'interview.wav', which megaedge calibrate did not write"):
        builder.build(speech_dir, mine, options, force=True)
    assert (mine / "clips" / "interview.wav").read_bytes() == b"x" and _hidden(mine) == []
    # The speech being simulated lives in the output's clips/: --force would delete it.
    data = tmp_path / "data"
    builder.build(speech_dir, data, options)
    listing = tmp_path / "from_set.jsonl"
    listing.write_text(json.dumps({"path": str(next((data / "clips").iterdir())), "text": "x"}) + "\n")
    with pytest.raises(MegaedgeError, match=r"--force would replace the speech being simulated"):
        builder.build(listing, data, options, force=True)
    with pytest.raises(MegaedgeError, match=r"--force would replace the speech being simulated"):
        builder.build(data / "manifest.jsonl", data, options, force=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MegaedgeError, match=r"afile: exists and is not a folder"):
        builder.build(speech_dir, tmp_path / "afile", options)


def test_stale_staging_of_dead_runs_is_cleared(speech_dir, tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process now
    stale_beside = tmp_path / f".set.partial-{dead.pid}-abc"
    (stale_beside / "clips").mkdir(parents=True)
    live = tmp_path / f".set.partial-{os.getppid()}-abc"  # the pytest runner's parent: alive
    live.mkdir()
    builder.build(speech_dir, tmp_path / "set", builder.BuildOptions.preset("smoke"))
    assert not stale_beside.exists() and live.is_dir()
    stale_inside = tmp_path / "set" / f".calibrate.partial-{dead.pid}-xyz"
    stale_inside.mkdir()
    builder.build(speech_dir, tmp_path / "set", builder.BuildOptions.preset("smoke"), force=True)
    assert not stale_inside.exists()


def test_unwritable_output_is_one_line(speech_dir, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MegaedgeError) as err:
        builder.build(speech_dir, tmp_path / "file" / "set", builder.BuildOptions.preset("smoke"))
    assert str(err.value) == f"{tmp_path / 'file'}: is a file, not a folder; choose another --out"
    with pytest.raises(MegaedgeError) as err:
        builder.build(speech_dir, tmp_path / "file" / "sub" / "set", builder.BuildOptions.preset("smoke"))
    assert str(err.value) == f"{tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file, so the folder cannot be " \
                             f"created; choose another --out"
    # root writes through chmod 555, so the read-only case is simulated where the staging folder is made.
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(MegaedgeError) as err:
        builder.build(speech_dir, tmp_path / "ro" / "set", builder.BuildOptions.preset("smoke"))
    assert str(err.value) == f"{tmp_path / 'ro'}: cannot write there (Permission denied); choose a writable --out folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder; the case is simulated above")
def test_read_only_output_folder_is_one_line(speech_dir, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(MegaedgeError, match=r"ro: cannot write there \(Permission denied\)"):
            builder.build(speech_dir, ro / "set", builder.BuildOptions.preset("smoke"))
    finally:
        ro.chmod(0o755)


def test_sigterm_stops_calibrate_without_a_partial_set(speech_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "set"
    code = "import sys\nfrom megaedge.cli.main import main\nsys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--no-progress", "calibrate", "--speech", str(speech_dir),
                             "--out", str(out), "--per-condition", "40", "--scenarios"],  # no scenarios
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".set.partial-*/clips/*.wav")):  # simulating: some clips written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "megaedge calibrate: stopped by SIGTERM; --out was left as it was"
    assert not out.exists() and _hidden(tmp_path) == []
