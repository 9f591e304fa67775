"""``megaedge eval``: the accuracy tables on the fixture's held-out clips, and the confidence table beside them."""

from __future__ import annotations

import json
import re

from tests.conftest import run_cli


def test_eval_reports_what_a_confidence_threshold_would_refuse(fixture_bundles, tmp_path):
    out = tmp_path / "eval.json"
    proc = run_cli("eval", str(fixture_bundles["merged"]), "--limit", "6", "--vad", "off", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    rows = report["clips"]
    assert len(rows) == 6 and all(isinstance(row["min_logprob"], float) for row in rows)
    exact = sum(row["exact"] for row in rows)
    for entry in report["confidence"]:
        assert (entry["exact"], entry["wrong"]) == (exact, 6 - exact)
        assert entry["exact_refused"] == sum(r["exact"] and r["min_logprob"] < entry["threshold"] for r in rows)
    lines = [line for line in proc.stdout.splitlines() if re.match(r"\| -[\d.]+ \|", line)]
    assert len(lines) == len(report["confidence"]) and f"/ {exact} (" in lines[0]
