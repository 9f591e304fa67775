"""The INT8 report's statistics and cost controls: the paired bootstrap of a WER delta, the clip subset the report
runs on, its bounds, and that an interrupted report never leaves a bundle that looks complete."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from megaedge.errors import MegaedgeError
from megaedge.export import int8
from megaedge.runtime import manifest
from tests.conftest import speechlike


def test_identical_systems_have_a_zero_interval():
    errors = np.random.default_rng(0).integers(0, 4, 200)
    words = np.random.default_rng(1).integers(3, 12, 200)
    assert int8.paired_delta(errors, errors, words) == (0.0, 0.0, 0.0)


def test_a_known_shift_excludes_zero_and_a_single_flip_does_not():
    rng = np.random.default_rng(2)
    words = rng.integers(4, 10, 300)
    a = rng.integers(0, 3, 300)
    b = a.copy()
    b[::10] += 1  # one more error in every tenth utterance: +30 errors
    delta, low, high = int8.paired_delta(a, b, words)
    assert delta == pytest.approx(100 * 30 / words.sum())
    assert 0 < low < delta < high
    c = a.copy()
    c[7] += 1  # one error more in one utterance: noise, the interval must include zero
    delta, low, high = int8.paired_delta(a, c, words)
    assert delta > 0 and low == 0.0 and high > 0


def test_bootstrap_is_seeded_and_paired():
    rng = np.random.default_rng(3)
    words = rng.integers(4, 10, 150)
    a = rng.integers(0, 5, 150)
    b = np.maximum(a + rng.integers(-1, 2, 150), 0)
    first, again = int8.paired_delta(a, b, words, seed=5), int8.paired_delta(a, b, words, seed=5)
    assert first == again
    assert int8.paired_delta(a, b, words, seed=6)[1:] != first[1:]
    # Paired: a large offset both systems share (hard clips) does not widen the interval of their difference.
    shared = rng.integers(0, 50, 150)
    assert int8.paired_delta(a + shared, b + shared, words, seed=5) == pytest.approx(first)
    with pytest.raises(ValueError, match="equally long"):
        int8.paired_delta(a, b[:-1], words)


def test_word_errors_count_substitutions_deletions_and_insertions():
    assert int8.word_errors("open the gate", "open the gate") == 0
    assert int8.word_errors("open the gate", "close gate now") == 3  # sub, del, ins
    refs, hyps = ["open the gate", "stop pump five", "<empty>"], ["open gate", "stop pump five six", "x"]
    import jiwer

    total = sum(int8.word_errors(r, h) for r, h in zip(refs, hyps)) / sum(len(r.split()) for r in refs)
    assert total == pytest.approx(jiwer.wer(refs, hyps))  # corpus WER = sum errors / sum words


def test_report_clips_spread_over_scenarios_deterministically():
    items = [{"id": f"{s}-{i}", "scenario": s} for s in ("clean", "noise", "reverberation") for i in range(10)]
    items += [{"id": "rare-0", "scenario": "factory_floor"}]
    chosen = int8.spread(items, 7)
    assert len(chosen) == 7 and chosen == int8.spread(items, 7)
    assert {c["scenario"] for c in chosen} == {"clean", "noise", "reverberation", "factory_floor"}
    assert [c["id"] for c in chosen] == ["clean-0", "clean-1", "noise-0", "noise-1", "reverberation-0",
                                         "reverberation-1", "rare-0"]  # the set's order kept
    assert int8.spread(items, None) is items and int8.spread(items, 1000) is items


def test_report_clips_bounds():
    from megaedge.cli import export as cli_export

    assert cli_export.REPORT_CLIPS == int8.REPORT_CLIPS
    with pytest.raises(MegaedgeError, match=r"--report-clips 0 is outside 1-100000"):
        int8.Int8Options(report_clips=0)
    assert int8.Int8Options(report_clips=1).report_clips == 1


@pytest.mark.parametrize("value", ["0", "100001", "x"])
def test_report_clips_outside_its_range_is_one_line(value, capsys):
    from megaedge.cli.main import main

    status = main(["export", "--int8", "--report-clips", value, "--out", "/nonexistent/q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and "--report-clips" in err[0], err


def _report(flag):
    entry = {"clips": 150, "wer_fp32": 10.0, "wer_int8": 11.2, "delta_int8": 1.2, "ci_int8": [0.4, 2.1],
             "flag_int8": flag, "target_int8": False, "agree_int8": 98.0, "cosine_int8": 0.999, "loop_int8": 0.0,
             "empty_int8": 0.0}
    return {"groups": {"all": entry, "condition:noise": entry}, "variants": ["fp32", "int8"],
            "size_mib": {"fp32": 1.0, "int8": 0.3}, "acceptance": int8.TARGET,
            "bootstrap": {"resamples": 2000, "seed": 0, "level": 0.95}}


def test_markdown_shows_delta_interval_flag_and_target():
    text = int8.format_report(_report("worse"))
    assert "| all | 150 | 10.00 | 11.20 | +1.20 [+0.40, +2.10] ▲ | 98.00 |" in text
    assert "missed by all, condition:noise." in text
    assert "▲" not in int8.format_report(_report(None)).split("\n")[2]


@pytest.fixture()
def clips(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    rows = []
    for i in range(4):
        sf.write(folder / f"c{i}.wav", speechlike(1.5 + i / 2, seed=i), 16000)
        rows.append({"path": f"c{i}.wav", "text": "open valve two", "scenario": "clean" if i < 2 else "noise",
                     "conditions": [] if i < 2 else ["noise"]})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_interrupted_report_leaves_no_manifest(tiny_bundles, clips, tmp_path, monkeypatch):
    seen = []

    def stop(*args, **kwargs):
        assert not (tmp_path / "q").exists()  # while the report runs there is no bundle at --out
        raise KeyboardInterrupt

    monkeypatch.setattr(int8, "compare", stop)
    options = int8.Int8Options(calib=str(clips), eval_set=str(clips / "manifest.jsonl"), compare=False)
    with pytest.raises(KeyboardInterrupt):
        int8.int8_from_fp32(tiny_bundles["merged"], tmp_path / "q", options, say=seen.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips"]  # no bundle, no hidden remains
    assert seen == ["quantization report: 2 variants (fp32, int8) x 4 clips; bound it with --report-clips N, "
                    "--no-compare or --no-report"]


def test_report_lists_its_files_and_intervals(tiny_bundles, clips, tmp_path, caplog):
    seen = []
    # recipe cpu: its int8 encoder is calibrated, so the report has a clean-calibration arm too (the default,
    # cpu-float-encoder, has none)
    options = int8.Int8Options(calib=str(clips), eval_set=str(clips / "manifest.jsonl"), report_clips=3,
                               recipe="cpu")
    with caplog.at_level("WARNING", logger="megaedge"):
        info = int8.int8_from_fp32(tiny_bundles["merged"], tmp_path / "q", options, say=seen.append)
    # the naive comparison arm is inaccurate by design, and this machine is not the device: no recipe advice
    assert not [r for r in caplog.records if r.name == "megaedge.runtime.recipe_advice"]
    assert manifest.read(tmp_path / "q").files == info.files
    assert {manifest.QUANT_REPORT_JSON, manifest.QUANT_REPORT_MD} <= set(info.files)
    report = json.loads((tmp_path / "q" / manifest.QUANT_REPORT_JSON).read_text())
    assert report["groups"]["all"]["clips"] == 3 and report["clips_in_set"] == 4
    assert report["variants"] == ["fp32", "int8", "naive_per_tensor", "clean_calibration"]
    for name in report["variants"][1:]:
        # 3 clips are too few for an interval: the delta is there, no interval, flag or verdict.
        entry = report["groups"]["all"]
        assert isinstance(entry[f"delta_{name}"], float)
        assert entry[f"ci_{name}"] is entry[f"flag_{name}"] is entry[f"target_{name}"] is None
    assert "(n < 10)" in (tmp_path / "q" / manifest.QUANT_REPORT_MD).read_text()
    assert seen[0].startswith("quantization report: 4 variants (fp32, int8, naive_per_tensor, clean_calibration) "
                              "x 3 of 4 clips, after quantizing the 2 comparison variants")
    assert any("clips, ~" in line and "left" in line for line in seen[1:])


def test_calibration_options_on_a_weights_only_recipe_say_they_do_nothing(tiny_bundles, clips, tmp_path, caplog):
    """The default recipe (cpu-float-encoder) reads no clips: --calib / --calib-cache were accepted in silence and the
    manifest named clips that shaped nothing. A static recipe uses them and records them."""
    for recipe, used in (("cpu-float-encoder", False), ("cpu", True)):
        options = int8.Int8Options(calib=str(clips), calib_cache=str(tmp_path / f"ranges-{recipe}"), report=False,
                                   recipe=recipe)
        caplog.clear()
        with caplog.at_level("WARNING", logger="megaedge"):
            info = int8.int8_from_fp32(tiny_bundles["merged"], tmp_path / recipe, options)
        said = [r.getMessage() for r in caplog.records if "shape no part of the bundle" in r.getMessage()]
        assert len(said) == (0 if used else 1)
        assert info.quantization["calibration"]["clips"] == (4 if used else 0)
        assert bool(list((tmp_path / f"ranges-{recipe}").glob("*.json"))) == used
