"""The evaluation set behind the INT8 report: held-out sentences and voices, severity levels, the espeak-ng-free
fallback, and the cache that lets a second call reuse the files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from megaedge.calibration import builder, heldout, speech


def test_test_sentences_are_the_fixture_split():
    sentences = heldout.test_sentences()
    assert len(sentences) > 1000 and len(set(sentences)) == len(sentences)
    assert all(speech.is_test_sentence(s) for s in sentences)
    # The same split training/train_fixture.py made: the shipped held-out set's first clean clips come first.
    from megaedge import fixture
    from megaedge.runtime.evaluate import read_set

    shipped = [i["text"] for i in read_set(fixture.heldout_manifest()) if i["scenario"] == "clean"]
    assert list(sentences[:3]) == shipped[:3]
    assert set(shipped) <= set(sentences)


def test_plan_is_deterministic_and_uses_only_test_voices():
    first, again, other = heldout.plan(50, 0), heldout.plan(50, 0), heldout.plan(50, 1)
    assert first == again and first != other
    pool = set(speech.voice_pool("test"))
    assert all((u.voice.accent, u.voice.variant) in pool for u in first)
    assert not set(speech.voice_pool("train")) & pool
    assert len({u.text for u in heldout.plan(600, 0)}) == 600  # distinct sentences before any repeats


def test_eval_preset_has_150_per_condition_at_four_severities():
    options = builder.BuildOptions.preset("eval").validated()
    jobs = builder.plan(options)
    for condition in builder.ATOMIC:
        assert sum(j.name == condition for j in jobs) == 150
    assert sum(j.kind == "clean" for j in jobs) == 150 and sum(j.kind == "scenario" for j in jobs) >= 54
    assert options.severity_levels == (0.3, 0.5, 0.7, 0.9)


@pytest.fixture()
def no_espeak(monkeypatch):
    monkeypatch.setattr(heldout, "espeak_version", lambda: None)


def _small(seed=0):
    return builder.BuildOptions(per_condition=4, scenarios=("factory_floor",), per_scenario=1, clean=2, seed=seed,
                                severity_levels=(0.3, 0.5, 0.7, 0.9))


def test_fallback_without_espeak_reuses_shipped_clips_and_says_so(no_espeak, tmp_path, caplog):
    source = heldout.heldout_speech(0, builder.SAMPLE_RATE)
    assert "espeak-ng not installed" in source.description
    manifest = builder.build(source, tmp_path / "set", _small())
    items = list(builder.read_manifest(manifest))
    assert len(items) == 2 + 7 * 4 + 1
    assert {i["origin"] for i in items} == {heldout.FALLBACK_ORIGIN}
    assert "espeak-ng not installed" in json.loads((tmp_path / "set" / builder.SET_INFO).read_text())["speech"]
    noise = [i for i in items if i["condition"] == "noise"]
    assert [i["severity"] for i in noise] == [0.3, 0.5, 0.7, 0.9]  # every level once per condition
    assert all(i["scenario"] == "noise" and i["conditions"] == ["noise"] for i in noise)
    clean = [i for i in items if i["scenario"] == "clean"]
    assert len(clean) == 2 and all(i["conditions"] == [] and i["severity"] == 0.0 for i in clean)
    scenario = next(i for i in items if i["scenario"] == "factory_floor")
    assert scenario["conditions"] == ["far_field", "noise", "recording", "distortion"]
    from megaedge import fixture
    from megaedge.runtime.evaluate import read_set

    shipped = {i["text"] for i in read_set(fixture.heldout_manifest()) if i["scenario"] == "clean"}
    assert {i["text"] for i in items} <= shipped


def test_same_inputs_reuse_the_set_and_any_change_rebuilds(no_espeak, tmp_path, monkeypatch):
    source = heldout.heldout_speech(0, builder.SAMPLE_RATE)
    out = tmp_path / "set"
    builder.build(source, out, _small())
    before = {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()}
    key = builder.set_key(source, _small())
    assert builder.reusable(out, key)
    builder.build(source, out, _small())  # no --force needed: nothing is written
    assert {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()} == before
    # seed, speech and code version are all part of the key
    assert builder.set_key(source, _small(seed=1)) != key
    other = builder.SpeechSet(source.description, "0" * 64, source.load)
    assert builder.set_key(other, _small()) != key
    monkeypatch.setattr(builder, "code_version", lambda: "changed")
    assert builder.set_key(source, _small()) != key
    monkeypatch.undo()
    # a set missing a clip is not reused
    next((out / "clips").iterdir()).unlink()
    assert not builder.reusable(out, key)


def test_builds_are_byte_identical_for_a_seed(no_espeak, tmp_path):
    source = heldout.heldout_speech(0, builder.SAMPLE_RATE)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        builder.build(source, tmp_path / name, _small(seed))
    digest = {n: [(p.name, p.read_bytes()) for p in sorted((tmp_path / n / "clips").iterdir())] for n in "abc"}
    assert digest["a"] == digest["b"] and digest["a"] != digest["c"]
    assert (tmp_path / "a" / "manifest.jsonl").read_bytes() == (tmp_path / "b" / "manifest.jsonl").read_bytes()


def test_default_out_is_a_cache_folder_named_by_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGAEDGE_CACHE", str(tmp_path))
    assert builder.default_out("ab" * 32) == tmp_path / "sets" / ("ab" * 8)


def test_calibrate_needs_speech_except_for_eval(capsys):
    from megaedge.cli.main import main

    status = main(["calibrate", "--preset", "smoke", "--out", "/nonexistent/x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and "--speech is required" in err[0], err


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_espeak_held_out_speech_is_16k_and_deterministic():
    version = heldout.espeak_version()
    source = heldout.synthesized(3, 0, builder.SAMPLE_RATE, version)
    assert source.digest == heldout.synthesized(3, 0, builder.SAMPLE_RATE, version).digest
    assert source.digest != heldout.synthesized(3, 1, builder.SAMPLE_RATE, version).digest
    loaded = source.load(30.0)
    assert len(loaded) == 3
    for (src, audio), utterance in zip(loaded, heldout.plan(3, 0)):
        assert src.text == utterance.text and src.origin == "espeak-ng"
        seconds = audio.size / builder.SAMPLE_RATE
        assert 0.5 < seconds < 10 and np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
        assert not audio[: utterance.lead].any()  # the planned leading silence
    again = source.load(30.0)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(loaded, again))
