"""runtime/evaluate.py: which groups a clip counts in."""

from megaedge.runtime.evaluate import group_keys


def test_a_clip_without_a_scenario_is_neither_clean_nor_degraded():
    """A set of path + text only put every clip in 'degraded' (a new user's probe)."""
    assert group_keys({"path": "a.wav", "text": "x"}) == ["all", "scenario:unlabelled"]
    assert group_keys({"path": "a.wav", "text": "x", "scenario": "unlabelled"}) == ["all", "scenario:unlabelled"]
    assert group_keys({"path": "a.wav", "text": "x", "scenario": "clean"}) == ["all", "clean", "scenario:clean"]
    assert group_keys({"path": "a.wav", "text": "x", "scenario": "factory_floor", "conditions": ["noise"]}) == [
        "all", "degraded", "scenario:factory_floor", "condition:noise"]


def test_a_set_without_references_is_refused_for_wer(tmp_path):
    """A calibration set (text null) given as an eval set scored 1055 % WER; text 5 or path null raised raw."""
    import json

    import pytest

    from megaedge.errors import MegaedgeError
    from megaedge.runtime.evaluate import read_set

    def manifest(*items):
        path = tmp_path / "set.jsonl"
        path.write_text("\n".join(json.dumps(item) for item in items))
        return path

    with pytest.raises(MegaedgeError, match=r"set.jsonl:2: 'text' is None, not a reference transcript"):
        read_set(manifest({"path": "a.wav", "text": "open"}, {"path": "b.wav", "text": None}))
    assert read_set(manifest({"path": "b.wav", "text": None}), need_text=False)[0]["text"] is None  # calibration
    with pytest.raises(MegaedgeError, match=r"set.jsonl:1: 'text' is 5"):
        read_set(manifest({"path": "a.wav", "text": 5}))
    with pytest.raises(MegaedgeError, match=r"set.jsonl:1: 'path' is None; give the clip's file path"):
        read_set(manifest({"path": None, "text": "a"}))
    assert read_set(manifest({"path": "a.wav", "text": ""}))[0]["text"] == ""  # silence: no words is a reference


def test_the_confidence_table_counts_what_a_threshold_refuses_and_catches():
    """A command interface refuses transcripts whose least likely token is under a threshold: how many right ones
    that costs and how many wrong ones it stops, on the user's clips (a transcript without tokens is refused)."""
    from megaedge.runtime.evaluate import evaluate, format_table

    clips = {"a": ("open valve", -0.02), "b": ("open valve", -0.7), "c": ("close valve", -0.3),
             "d": ("close valve", -1.5), "e": ("", None)}
    items = [{"path": f"/x/{k}.wav", "text": "open valve", "scenario": "clean"} for k in clips]

    def transcribe(path):
        text, least = clips[path[3]]
        return text, False, "merged", least

    report = evaluate(transcribe, items)
    assert [row["exact"] for row in report["clips"]] == [True, True, False, False, False]
    table = {row["threshold"]: row for row in report["confidence"]}
    assert (table[-0.05]["exact_refused"], table[-0.05]["wrong_caught"]) == (1, 3)
    assert (table[-0.5]["exact_refused"], table[-0.5]["wrong_caught"]) == (1, 2)
    assert (table[-1.0]["exact_refused"], table[-1.0]["wrong_caught"]) == (0, 2)
    assert (table[-4.0]["exact_refused"], table[-4.0]["wrong_caught"]) == (0, 1)  # only the empty one
    assert table[-0.5]["exact_refused_pct"] == 50.0 and table[-0.5]["wrong_caught_pct"] == 66.7
    assert "| -0.5 | 1 / 2 (50.0 %) | 2 / 3 (66.7 %) |" in format_table(report)
    # a clip where nothing was said and nothing transcribed is neither an exact command refused nor a wrong one
    silent = [*items, {"path": "/x/f.wav", "text": "", "scenario": "clean"}]
    clips["f"] = ("", None)
    with_silence = evaluate(transcribe, silent)
    assert with_silence["confidence"] == report["confidence"] and with_silence["confidence_silent_clips"] == 1
    assert "(left out: 1 clip with nothing said and nothing transcribed)" in format_table(with_silence)
    # a transcriber that gives no confidence: no table, nothing invented
    plain = evaluate(lambda path: (clips[path[3]][0], False, "merged"), items)
    assert "confidence" not in plain and "Refusing" not in format_table(plain)
