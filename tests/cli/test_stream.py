"""``megaedge stream`` from standard input: the pipes of a device without PortAudio (``arecord | megaedge stream B
--file -``, ``ffmpeg ... -f s16le - | megaedge stream B --file - --raw 16000``)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tests.cli.conftest import run_with_stdin as _cli


def _streaming_wav(pcm: np.ndarray, rate: int, channels: int = 1) -> bytes:
    """A WAV as arecord writes it to a pipe: RIFF and data sizes 0xFFFFFFFF (the length is not known)."""
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * 2 * channels, 2 * channels, 16)
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", 0xFFFFFFFF)
            + pcm.astype("<i2").tobytes())


def _finals(proc) -> list[tuple]:
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    return [(e["start"], e["end"], e["text"]) for e in events if e["kind"] == "final"]


def test_standard_input_streams_as_the_file_does(fixture_bundles, clip):
    """A WAV stream of open length, raw PCM with --raw, and stereo: the finals of the same audio as a file."""
    path, samples, rate = clip
    bundle = str(fixture_bundles["merged"])
    want = _finals(_cli("stream", bundle, "--file", str(path), "--json"))
    assert any(text for _, _, text in want)
    assert _finals(_cli("stream", bundle, "--file", "-", "--json", stdin=_streaming_wav(samples, rate))) == want
    assert _finals(_cli("stream", bundle, "--file", "-", "--raw", str(rate), "--json",
                        stdin=samples.astype("<i2").tobytes())) == want
    stereo = np.stack([samples, samples], axis=1).reshape(-1)
    assert _finals(_cli("stream", bundle, "--file", "-", "--json", stdin=_streaming_wav(stereo, rate, 2))) == want
    # --seconds stops reading a producer that does not end
    short = _finals(_cli("stream", bundle, "--file", "-", "--raw", str(rate), "--seconds", "1", "--json",
                         stdin=samples.astype("<i2").tobytes()))
    assert short[-1][1] == pytest.approx(1.0, abs=0.01)


def test_a_24_bit_stream_with_a_quiet_start_is_not_judged(fixture_bundles, clip):
    """A 24-bit WAV on standard input decodes to int32 blocks; a stream judges int32 blocks whose peak fits 16 bits
    as a scale mistake, so a file whose first 1.5 s were dither near -98 dBFS was refused. A file's samples are
    what its format says: the same audio streams as the file does."""
    _, samples, rate = clip
    rng = np.random.default_rng(0)
    dither = rng.integers(-100, 101, size=int(1.5 * rate))  # 24-bit values
    values = np.concatenate([dither, samples.astype(np.int64) << 8])
    packed = np.stack([(values >> s) & 0xFF for s in (0, 8, 16)], axis=-1).astype(np.uint8).tobytes()
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 3, 3, 24)
    wav = b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", 0xFFFFFFFF)
    finals = _finals(_cli("stream", str(fixture_bundles["merged"]), "--file", "-", "--json", stdin=wav + packed))
    assert any(text for _, _, text in finals)


@pytest.mark.parametrize("args,stdin,message", [
    (("--file", "-"), b"not a wav header at all", "standard input is not a WAV stream (it does not start with "
                                                  "RIFF....WAVE); for raw PCM pass --raw RATE"),
    (("--file", "-"), b"", "standard input is not a WAV stream (it is empty)"),
    (("--file", "-", "--raw", "5"), b"", "--raw 5 is not a rate in whole Hz (1000-768000)"),
    (("--file", "x.wav", "--raw", "16000"), b"", "--raw describes standard input's PCM: use it with --file -"),
    (("--file", "-", "--realtime"), b"", "--realtime paces a file; standard input comes at its producer's pace"),
])
def test_standard_input_mistakes_are_one_line(fixture_bundles, args, stdin, message):
    proc = _cli("stream", str(fixture_bundles["merged"]), *args, stdin=stdin)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr


def test_a_signal_while_reading_a_pipe_flushes_all_that_arrived(fixture_bundles, clip):
    """SIGTERM while the stream waits for the rest of a hop: the final covers every sample the producer wrote
    (the part of a hop that had arrived was dropped: with --hop 5 a 6.9 s command ended at 5 s)."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    from tests.cli.conftest import CLI
    from tests.conftest import REPO

    _, samples, rate = clip
    proc = subprocess.Popen([sys.executable, "-c", CLI, "stream", str(fixture_bundles["merged"]), "--file", "-",
                             "--raw", str(rate), "--hop", "5", "--no-endpoint", "--json"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    writer = threading.Thread(target=lambda: (proc.stdin.write(samples.astype("<i2").tobytes()),
                                              proc.stdin.flush()))
    writer.start()  # the pipe stays open: the producer is still "recording"
    writer.join(60)
    first = proc.stdout.readline()  # the partial of the first whole hop: the stream is running
    assert json.loads(first)["kind"] == "partial"
    time.sleep(2.0)  # the rest has reached the reader, which waits for more
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    finals = [json.loads(line) for line in out.decode().splitlines() if json.loads(line)["kind"] == "final"]
    assert proc.returncode == 0, err.decode()
    assert finals[-1]["end"] == pytest.approx(len(samples) / rate, abs=1e-3)
