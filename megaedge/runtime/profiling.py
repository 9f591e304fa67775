"""Where a bundle's time goes, from onnxruntime's per-node traces (``megaedge bench --profile DIR``).

Per graph: the time inside runs, the part spent in nodes and outside them (input/output copies, synchronisation,
the executor), the node time per execution provider (a node onnxruntime placed on the CPU inside a GPU graph shows
up here, with the copies it forces) and the operator types that cost most. On the CUDA provider a node's time is the
host's time to launch it, not the GPU's time to run it: there, a large "outside nodes" share is the wait for the GPU.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

KERNEL_SUFFIX = "_kernel_time"


def summarize(trace: Path | list, top: int = 8) -> dict:
    """Summary of one onnxruntime profile (the JSON list ``end_profiling()`` writes, or its path); times in ms."""
    events = json.loads(Path(trace).read_text()) if not isinstance(trace, list) else trace
    per_op: dict[str, list] = defaultdict(lambda: [0.0, 0])
    per_provider: dict[str, float] = defaultdict(float)
    run_us, runs = 0.0, 0
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            run_us += event.get("dur", 0)
            runs += 1
        elif event.get("cat") == "Node" and event.get("name", "").endswith(KERNEL_SUFFIX):
            args = event.get("args", {})
            per_op[args.get("op_name", "?")][0] += event.get("dur", 0)
            per_op[args.get("op_name", "?")][1] += 1
            per_provider[args.get("provider", "?")] += event.get("dur", 0)
    node_us = sum(per_provider.values())
    ranked = sorted(per_op.items(), key=lambda item: -item[1][0])[:top]
    return {
        "runs": runs,
        "run_ms": round(run_us / 1e3, 3),
        "node_ms": round(node_us / 1e3, 3),
        "outside_nodes_ms": round(max(run_us - node_us, 0.0) / 1e3, 3),
        "by_provider_ms": {name: round(us / 1e3, 3) for name, us in sorted(per_provider.items(), key=lambda i: -i[1])},
        "top_ops": [{"op": op, "ms": round(us / 1e3, 3), "calls": calls,
                     "share_of_nodes": round(us / node_us, 4) if node_us else 0.0} for op, (us, calls) in ranked],
    }


def collect(sessions: dict) -> dict:
    """End profiling on every onnxruntime session of a transcriber (writing the traces) and summarize each."""
    out = {}
    for name, session in sessions.items():
        inner = getattr(session, "session", None)
        if inner is None or not hasattr(inner, "end_profiling"):
            continue  # a TensorRT engine session: no onnxruntime trace
        trace = inner.end_profiling()
        summary = summarize(Path(trace)) if trace else None
        if summary and summary["runs"]:  # graphs the runs never called (a merged bundle's router) are left out
            out[name] = {"trace": Path(trace).name, **summary}
    return out


def format_profile(profile: dict) -> str:
    lines = ["| graph | runs | run ms | in nodes ms | outside nodes ms | by provider ms | top operators (ms) |",
             "|---|---|---|---|---|---|---|"]
    for name, p in profile.items():
        providers = ", ".join(f"{k.replace('ExecutionProvider', '')} {v:.1f}" for k, v in p["by_provider_ms"].items())
        ops = ", ".join(f"{o['op']} {o['ms']:.1f}" for o in p["top_ops"][:5])
        lines.append(f"| {name} | {p['runs']} | {p['run_ms']:.1f} | {p['node_ms']:.1f} | {p['outside_nodes_ms']:.1f} "
                     f"| {providers} | {ops} |")
    return "\n".join(lines)
