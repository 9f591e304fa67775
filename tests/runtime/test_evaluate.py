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
