"""Profile summaries: the arithmetic on a hand-made trace, and `megaedge bench --profile` on the fixture."""

from __future__ import annotations

import json

from megaedge.runtime import profiling
from tests.conftest import run_cli


def _node(op: str, provider: str, dur: int) -> dict:
    return {"cat": "Node", "name": f"/layer/{op}{dur}_kernel_time", "dur": dur,
            "args": {"op_name": op, "provider": provider}}


def test_summary_splits_nodes_by_operator_and_provider():
    trace = [
        {"cat": "Session", "name": "model_run", "dur": 1000},
        {"cat": "Session", "name": "model_run", "dur": 1500},
        _node("MatMul", "CUDAExecutionProvider", 900),
        _node("MatMul", "CUDAExecutionProvider", 600),
        _node("Range", "CPUExecutionProvider", 300),
        {"cat": "Node", "name": "/layer/MatMul_fence_before", "dur": 50, "args": {"op_name": "MatMul"}},
        {"cat": "Session", "name": "session_initialization", "dur": 99999},
    ]
    s = profiling.summarize(trace)
    assert (s["runs"], s["run_ms"], s["node_ms"], s["outside_nodes_ms"]) == (2, 2.5, 1.8, 0.7)
    assert s["by_provider_ms"] == {"CUDAExecutionProvider": 1.5, "CPUExecutionProvider": 0.3}
    assert s["top_ops"][0] == {"op": "MatMul", "ms": 1.5, "calls": 2, "share_of_nodes": round(1.5 / 1.8, 4)}
    assert [o["op"] for o in s["top_ops"]] == ["MatMul", "Range"]
    assert "CPU 0.3" in profiling.format_profile({"encoder": s})


def test_bench_profile_writes_traces_and_summaries(fixture_bundles, tmp_path):
    out, traces = tmp_path / "bench.json", tmp_path / "traces"
    proc = run_cli("bench", str(fixture_bundles["merged"]), "--audio", "3", "--repeat", "1", "--tokens", "4",
                   "--threads", "2", "--json", str(out), "--profile", str(traces))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    profile = report["profile"]
    assert set(profile) == {"encoder", "decoder"}  # a merged bundle runs no router
    for name, summary in profile.items():
        assert (traces / summary["trace"]).is_file() and summary["trace"].startswith(name)
        assert summary["runs"] >= 1 and summary["node_ms"] > 0 and summary["run_ms"] >= summary["node_ms"] * 0.5
        assert set(summary["by_provider_ms"]) == {"CPUExecutionProvider"}
    assert profile["decoder"]["runs"] == 4  # prefill + 3 decode steps
    assert any(o["op"] in ("MatMul", "FusedMatMul", "Gemm") for o in profile["decoder"]["top_ops"])
    assert "profiled (one run per length" in proc.stdout and "| decoder |" in proc.stdout
