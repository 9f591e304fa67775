"""Accuracy on a labelled clip set (the calibration builder's JSONL manifest format): WER/CER per scenario and
condition with jiwer, empty-output rate, loop-guard rate, route statistics, and how well the lowest token
log-probability separates exact transcripts from wrong ones."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from megaedge.errors import MegaedgeError, require
from megaedge.progress import track

_PUNCT = re.compile(r"[^\w\s']")


def normalize(text: str) -> str:
    """Case- and punctuation-insensitive comparison text (what WER is computed on)."""
    return " ".join(_PUNCT.sub(" ", (text or "").lower()).split())


def read_set(path: str | Path, need_text: bool = True) -> list[dict]:
    """Items of a JSONL set; ``path`` of each item resolved against the manifest's folder; ``text`` required, and
    (``need_text``: a set WER is measured on) a string: a calibration set's ``null`` would score every word."""
    manifest = Path(path).expanduser()
    if not manifest.is_file():
        raise MegaedgeError(f"{manifest}: no such clip-set manifest (a JSONL file with path and text per line)")
    try:
        text = manifest.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # an audio file given where the list belongs
        raise MegaedgeError(f"{manifest}: not a text file; expected a JSONL clip list (path and text per line), "
                            "not audio") from None
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MegaedgeError(f"{manifest}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(item, dict) or "path" not in item or "text" not in item:
            raise MegaedgeError(f"{manifest}:{number}: each line needs 'path' and 'text' (reference transcript)")
        if not isinstance(item["path"], str) or not item["path"]:
            raise MegaedgeError(f"{manifest}:{number}: 'path' is {item['path']!r}; give the clip's file path")
        if need_text and not isinstance(item["text"], str):
            raise MegaedgeError(f"{manifest}:{number}: 'text' is {item['text']!r}, not a reference transcript; a set "
                                "scored for WER needs the words said in each clip (\"\" for none)")
        item["path"] = str((manifest.parent / item["path"]).resolve())
        items.append(item)
    if not items:
        raise MegaedgeError(f"{manifest}: no clips listed")
    return items


@dataclass
class Group:
    refs: list[str] = field(default_factory=list)
    hyps: list[str] = field(default_factory=list)
    empty: int = 0
    loops: int = 0
    routes: dict = field(default_factory=lambda: defaultdict(int))

    def add(self, ref: str, hyp: str, loop: bool, route: str) -> None:
        self.refs.append(normalize(ref))
        self.hyps.append(normalize(hyp))
        self.empty += not normalize(hyp)
        self.loops += bool(loop)
        self.routes[route] += 1

    def summary(self) -> dict:
        jiwer = require("jiwer", "eval")
        refs = [r if r else "<empty>" for r in self.refs]
        n = len(self.refs)
        return {"clips": n, "wer": round(100 * jiwer.wer(refs, self.hyps), 2),
                "cer": round(100 * jiwer.cer(refs, self.hyps), 2), "empty_rate": round(100 * self.empty / n, 2),
                "loop_rate": round(100 * self.loops / n, 2), "routes": dict(self.routes)}


def group_keys(item: dict) -> list[str]:
    """Every group a clip belongs to: all, clean/degraded, its scenario, and each of its conditions. A clip whose
    set gives no scenario is in neither clean nor degraded: nothing says which it is."""
    scenario = item.get("scenario")
    if scenario in (None, "unlabelled"):
        keys = ["all", "scenario:unlabelled"]
    else:
        keys = ["all", "clean" if scenario == "clean" else "degraded", f"scenario:{scenario}"]
    keys += [f"condition:{c}" for c in item.get("conditions", [])]
    return keys


def evaluate(transcribe, items: list[dict], desc: str = "eval") -> dict:
    """``transcribe(path) -> (text, loop_guard, route[, min_logprob])``; returns {group: summary}, per-clip rows
    and, when the lowest token log-probabilities are given, what refusing below each threshold would do."""
    groups: dict[str, Group] = defaultdict(Group)
    rows = []
    for item in track(items, desc=desc, unit="clip"):
        text, loop, route, *least = transcribe(item["path"])
        for key in group_keys(item):
            groups[key].add(item["text"], text, loop, route)
        row = {"id": item.get("id", Path(item["path"]).stem), "ref": item["text"], "hyp": text, "route": route,
               "exact": normalize(text) == normalize(item["text"])}
        if least:
            row["min_logprob"] = least[0]
        rows.append(row)
    order = sorted(groups, key=lambda k: (k != "all", k not in ("clean", "degraded"), k))
    report = {"groups": {k: groups[k].summary() for k in order}, "clips": rows}
    if rows and all("min_logprob" in row for row in rows):
        report["confidence"] = confidence_table(rows)
        report["confidence_silent_clips"] = sum(_silent(row) for row in rows)
    return report


def _silent(row: dict) -> bool:
    """Nothing said and nothing transcribed: no command to accept or refuse."""
    return not normalize(row["ref"]) and not normalize(row["hyp"])


# Where a command interface might refuse (or ask to confirm) a transcript: its least likely token under e^T.
THRESHOLDS = (-0.05, -0.1, -0.25, -0.5, -1.0, -2.0, -4.0)


def confidence_table(rows: list[dict], thresholds=THRESHOLDS) -> list[dict]:
    """For each threshold T, refusing every transcript whose lowest token log-probability is under T (one without
    tokens counts as refused: there is nothing to act on): how many exact transcripts that refuses, and how many
    wrong ones it catches. The trade a command interface chooses its threshold by, on the user's own clips. Clips
    where nothing was said and nothing transcribed count in neither column: no tokens is their right answer."""
    exact = [row for row in rows if row["exact"] and not _silent(row)]
    wrong = [row for row in rows if not row["exact"]]

    def refused(row, threshold) -> bool:
        return row["min_logprob"] is None or row["min_logprob"] < threshold

    table = []
    for threshold in thresholds:
        lost = sum(refused(row, threshold) for row in exact)
        caught = sum(refused(row, threshold) for row in wrong)
        table.append({"threshold": threshold, "exact": len(exact), "exact_refused": lost,
                      "exact_refused_pct": round(100 * lost / len(exact), 1) if exact else None,
                      "wrong": len(wrong), "wrong_caught": caught,
                      "wrong_caught_pct": round(100 * caught / len(wrong), 1) if wrong else None})
    return table


def format_table(report: dict) -> str:
    lines = ["| group | clips | WER % | CER % | empty % | loop % | routes |", "|---|---:|---:|---:|---:|---:|---|"]
    for key, s in report["groups"].items():
        routes = ", ".join(f"{k}:{v}" for k, v in sorted(s["routes"].items()))
        lines.append(f"| {key} | {s['clips']} | {s['wer']:.2f} | {s['cer']:.2f} | {s['empty_rate']:.1f} | "
                     f"{s['loop_rate']:.1f} | {routes} |")
    if report.get("confidence"):
        pct = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        silent = report.get("confidence_silent_clips")
        clips = "clip" if silent == 1 else "clips"
        left_out = f" (left out: {silent} {clips} with nothing said and nothing transcribed)" if silent else ""
        lines += ["", f"Refusing transcripts whose least likely token has a log-probability under T{left_out}:", "",
                  "| T | exact transcripts refused | wrong transcripts caught |", "|---:|---:|---:|"]
        for row in report["confidence"]:
            lines.append(f"| {row['threshold']:g} | {row['exact_refused']} / {row['exact']} "
                         f"({pct(row['exact_refused_pct'])} %) | {row['wrong_caught']} / {row['wrong']} "
                         f"({pct(row['wrong_caught_pct'])} %) |")
    return "\n".join(lines)
