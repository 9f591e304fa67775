"""Measure the shipped fixture with transformers' own generate (through megaedge's foundation loader).

    python training/evaluate_fixture.py [--out megaedge/assets/fixture/RESULTS.md]

Writes the results table (markdown + JSON beside it): WER per route (base, merged = LoRA, auto = router) for the
clean clips, each atomic condition, the mixed scenarios and everything together, plus router accuracy.
tests/export/test_fixture.py asserts the issue's thresholds on the same computation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from megaedge import fixture  # noqa: E402
from megaedge.runtime.evaluate import normalize, read_set  # noqa: E402

ROUTES = ("base", "merged", "auto")


def measure(loaded=None, items=None) -> dict:
    """{route: {group: wer%}}, router accuracy and per-clip hypotheses."""
    import jiwer

    from megaedge.export.loader import load_checkpoint
    from megaedge.export.reference import transcribe

    loaded = loaded or load_checkpoint(fixture.model_dir(), lora="branches")
    items = items or read_set(fixture.heldout_manifest())
    hyps = {route: [] for route in ROUTES}
    routed_lora = []
    for item in items:
        for route in ROUTES:
            result = transcribe(loaded, item["path"], route=route)
            hyps[route].append(normalize(result.text))
            if route == "auto":
                routed_lora.append(result.route == "merged")
    groups = {"clean": lambda it: it["scenario"] == "clean",
              "atomic": lambda it: it["scenario"] in it.get("conditions", []) and len(it["conditions"]) == 1,
              "mixed_scenarios": lambda it: len(it.get("conditions", [])) > 1,
              "degraded": lambda it: it["scenario"] != "clean", "all": lambda it: True}
    conditions = sorted({it["scenario"] for it in items if len(it.get("conditions", [])) == 1})
    for cond in conditions:
        groups[f"condition:{cond}"] = lambda it, c=cond: it["scenario"] == c
    table = {}
    for route in ROUTES:
        table[route] = {}
        for name, keep in groups.items():
            idx = [i for i, it in enumerate(items) if keep(it)]
            refs = [normalize(items[i]["text"]) for i in idx]
            table[route][name] = round(100 * jiwer.wer(refs, [hyps[route][i] for i in idx]), 2)
    truth = [it["scenario"] != "clean" for it in items]
    accuracy = 100 * sum(a == b for a, b in zip(routed_lora, truth)) / len(items)
    counts = {name: sum(1 for it in items if keep(it)) for name, keep in groups.items()}
    return {"wer": table, "router_accuracy": round(accuracy, 2), "clips": counts,
            "hypotheses": {r: hyps[r] for r in ROUTES}}


def markdown(report: dict) -> str:
    wer, counts = report["wer"], report["clips"]
    lines = ["| held-out group | clips | base WER % | LoRA-merged WER % | routed (auto) WER % |",
             "|---|---:|---:|---:|---:|"]
    for group in wer["base"]:
        lines.append(f"| {group} | {counts[group]} | {wer['base'][group]:.2f} | {wer['merged'][group]:.2f} | "
                     f"{wer['auto'][group]:.2f} |")
    lines.append("")
    lines.append(f"Router accuracy, clean vs degraded: {report['router_accuracy']:.1f} % ({counts['all']} clips).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=fixture.ROOT / "RESULTS.md")
    args = parser.parse_args(argv)
    report = measure()
    text = markdown(report)
    print(text)
    args.out.write_text("# Fixture results (transformers generate, greedy)\n\n" + text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({k: v for k, v in report.items() if k != "hypotheses"},
                                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
