"""runtime/evaluate.py: which groups a clip counts in."""

from megaedge.runtime.evaluate import group_keys


def test_a_clip_without_a_scenario_is_neither_clean_nor_degraded():
    """A set of path + text only put every clip in 'degraded' (a new user's probe)."""
    assert group_keys({"path": "a.wav", "text": "x"}) == ["all", "scenario:unlabelled"]
    assert group_keys({"path": "a.wav", "text": "x", "scenario": "unlabelled"}) == ["all", "scenario:unlabelled"]
    assert group_keys({"path": "a.wav", "text": "x", "scenario": "clean"}) == ["all", "clean", "scenario:clean"]
    assert group_keys({"path": "a.wav", "text": "x", "scenario": "factory_floor", "conditions": ["noise"]}) == [
        "all", "degraded", "scenario:factory_floor", "condition:noise"]
