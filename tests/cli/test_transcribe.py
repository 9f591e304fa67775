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


def test_standard_input_is_judged_as_it_is_read(monkeypatch, clip):
    """It was read whole before anything was checked: ``cat /dev/zero`` or a capture left running grew until the
    OOM killer. Its start is judged at 64 KiB, and its size against free memory as it grows."""
    import io

    import pytest

    from megaedge.cli.transcribe import _read_stdin
    from megaedge.errors import AudioError
    from megaedge.runtime import audio

    class Endless(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buffer):
            buffer[:] = bytes(len(buffer))
            self.served = getattr(self, "served", 0) + len(buffer)
            return len(buffer)

    zeros = Endless()
    with pytest.raises(AudioError, match="standard input: cannot read audio"):
        _read_stdin(io.BufferedReader(zeros))
    assert zeros.served <= 2 << 20  # refused after the first read, not at the end of an endless stream
    path, _, _ = clip
    assert _read_stdin(io.BytesIO(path.read_bytes())) == path.read_bytes()
    wav_stream = path.read_bytes()[:44] + bytes(8 << 20)  # a WAV header, then 8 MiB of a capture still running
    monkeypatch.setattr(audio, "available_bytes", lambda: 16 << 20)
    with pytest.raises(AudioError, match=r"standard input: 0.0 GiB read and more coming, over a quarter of the"):
        _read_stdin(io.BytesIO(wav_stream))


def test_subtitles_of_a_file(fixture_bundles, clip):
    path, _, _ = clip
    bundle = str(fixture_bundles["merged"])
    doc = json.loads(_cli("transcribe", bundle, str(path), "--json").stdout)
    srt = _cli("transcribe", bundle, str(path), "--format", "srt")
    assert srt.returncode == 0, srt.stderr
    seg = doc["segments"][0]
    end = round(seg["end"] * 1000)
    lines = srt.stdout.splitlines()
    assert lines[:2] == ["1", f"00:00:00,000 --> 00:00:{end // 1000:02d},{end % 1000:03d}"]
    assert " ".join(lines[2:]) == doc["text"] and srt.stdout.endswith("\n")
    vtt = _cli("transcribe", bundle, "-", "--format", "vtt", stdin=path.read_bytes())
    assert vtt.stdout.splitlines() == ["WEBVTT", "", lines[0], lines[1].replace(",", "."), *lines[2:]], vtt.stderr
    both = _cli("transcribe", bundle, str(path), "--json", "--format", "srt")
    assert both.returncode == 1 and both.stderr.count("\n") == 1 and "two outputs" in both.stderr
    many = _cli("transcribe", bundle, str(path), str(path), "--format", "vtt")
    assert many.returncode == 1 and many.stderr.count("\n") == 1 and "one file per run" in many.stderr
