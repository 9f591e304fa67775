"""``megaedge transcribe``: a file from standard input (``cat clip.flac | megaedge transcribe B -``)."""

from __future__ import annotations

import json

from tests.cli.conftest import run_with_stdin as _cli


def test_transcribe_reads_a_file_from_standard_input(fixture_bundles, clip):
    path, _, _ = clip
    bundle = str(fixture_bundles["merged"])
    want = _cli("transcribe", bundle, str(path), "--json")
    assert want.returncode == 0, want.stderr
    got = _cli("transcribe", bundle, "-", "--json", stdin=path.read_bytes())
    assert got.returncode == 0, got.stderr
    assert {**json.loads(got.stdout), "file": str(path), "timings": None} == {**json.loads(want.stdout),
                                                                               "timings": None}
    twice = _cli("transcribe", bundle, "-", "-", stdin=path.read_bytes())
    assert twice.returncode == 1 and twice.stderr.strip() == ("megaedge transcribe: error: standard input (-) holds "
                                                              "one file: give - once")
    empty = _cli("transcribe", bundle, "-")
    assert empty.returncode == 1 and "standard input: the file is empty (0 bytes)" in empty.stderr
