"""The documentation against the code: README length, every `megaedge CMD --option` the docs name exists in the
command line, every linked document exists, and every benchmark result names its date, commit, command and machine
(and results/suite.md is what benchmarks/report.py builds from them)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest

from megaedge.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
RESULTS = ROOT / "benchmarks" / "results"
README_MAX_LINES = 300
RESULT_KEYS = ("date", "commit", "command", "machine")
# Linked from the README but written in another change; remove once it exists.
PENDING_DOCS = {"docs/serving.md"}

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
# "megaedge CMD" where megaedge is a word of its own (not megaedge/..., megaedge.runtime, megaedge[mic], megaedge-0.1)
INVOCATION = re.compile(r"(?<![\w./-])megaedge((?:\s+-[-\w]+)*)\s+([A-Za-z][\w-]*)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, dict(sub.choices)


def _snippets(text: str) -> list[str]:
    """Command lines the document shows: each line of a fenced block (comments cut), then each inline code span."""
    lines = []
    for block in FENCE.findall(text):
        lines += [line.split(" # ")[0] for line in block.splitlines()]
    lines += INLINE.findall(FENCE.sub("", text))
    return lines


def _invocations(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(command, global options, options named after it) for every `megaedge CMD ...` in the document's code."""
    found = []
    for snippet in _snippets(text):
        matches = list(INVOCATION.finditer(snippet))
        for i, match in enumerate(matches):
            command = match.group(2)
            if command.isupper():  # a placeholder: "megaedge CMD --help"
                continue
            end = matches[i + 1].start() if i + 1 < len(matches) else len(snippet)
            tail = snippet[match.end():end]
            found.append((command, OPTION.findall(match.group(1)), OPTION.findall(tail)))
    return found


DOCUMENTS = [README, *DOCS]


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/ (limit {README_MAX_LINES})"


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {"device.md", "bundle.md", "int8.md", "streaming.md", "benchmarks.md"} <= names


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_commands_and_options_exist(doc: Path):
    top, commands = _parsers()
    invocations = _invocations(doc.read_text())
    problems = []
    for command, global_options, options in invocations:
        for option in global_options:
            if option not in top._option_string_actions:
                problems.append(f"megaedge {option}: no such global option")
        if command not in commands:
            problems.append(f"megaedge {command}: no such command (have {', '.join(sorted(commands))})")
            continue
        known = commands[command]._option_string_actions
        problems += [f"megaedge {command} {option}: no such option" for option in options if option not in known]
    assert not problems, f"{doc.name}:\n" + "\n".join(sorted(set(problems)))


def test_readme_names_every_command():
    _, commands = _parsers()
    named = {command for command, _, _ in _invocations(README.read_text())}
    missing = sorted(set(commands) - named)
    assert not missing, f"README.md's command table lacks: {', '.join(missing)}"


def test_the_scanner_sees_options():
    # the checks above are only as good as this parsing
    text = "```bash\nmegaedge -v export M --out B --int8   # --not-this\n```\nand `megaedge bench B --tokens 8`, " \
           "`megaedge CMD --help`, megaedge/cli/x.py, `pip install 'megaedge[mic]'`"
    assert _invocations(text) == [("export", [], ["--out", "--int8"]), ("bench", [], ["--tokens"])]


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path):
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if "://" in target:
            continue
        path = (doc.parent / target).resolve()
        if not path.exists() and path.relative_to(ROOT).as_posix() not in PENDING_DOCS:
            missing.append(target)
    assert not missing, f"{doc.name} links to missing files: {missing}"


def test_no_unpublished_install_or_removed_options():
    for doc in DOCUMENTS:
        text = doc.read_text()
        assert not re.search(r"pip install ['\"]?megaedge(\[|['\"\s]|$)", text, re.M), \
            f"{doc.name}: megaedge is not on a package index; install from a clone or a wheel"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_result_names_its_run(path: Path):
    doc = json.loads(path.read_text())
    missing = [key for key in RESULT_KEYS if not doc.get(key)]
    assert not missing, f"{path.name} lacks {missing}: every result names its date, commit, command and machine"
    local = re.search(r"(?<![\w.])/(tmp|home|root|work|mnt|Users)/[^\s\"']*", path.read_text())
    assert not local, f"{path.name} names {local.group()}: commands name DIR or B, not this machine's paths"


def test_suite_md_is_generated_from_the_results():
    spec = importlib.util.spec_from_file_location("benchmarks_report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert (RESULTS / "suite.md").read_text() == report.render(report.load(RESULTS)), \
        "benchmarks/results/suite.md is out of date: run python benchmarks/report.py"
    assert not list(RESULTS.glob("*.png")), "plots are drawn on demand (report.py --plot DIR), not committed"
