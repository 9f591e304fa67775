import hashlib
import json

import numpy as np
import pytest
import soundfile as sf

from megaedge.calibration import builder, scenarios
from megaedge.errors import AudioError, MegaedgeError
from tests.conftest import run_cli, speechlike


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
