"""runtime/pipe.py: WAV streams and raw PCM from a pipe (``megaedge stream --file -``)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from megaedge.errors import AudioError
from megaedge.runtime import pipe


def _wav(fmt_body: bytes, data: bytes, data_size: int | None = None, before_data: bytes = b"",
         after_data: bytes = b"") -> bytes:
    size = len(data) if data_size is None else data_size
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_body))
            + fmt_body + before_data + b"data" + struct.pack("<I", size) + data + after_data)


def _fmt(tag: int, channels: int, rate: int, bits: int, extensible_tag: int | None = None) -> bytes:
    block = channels * bits // 8
    body = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    if extensible_tag is not None:  # cbSize, valid bits, channel mask, then the sub-format GUID
        body += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", extensible_tag) + bytes(14)
    return body


def _read_all(stream: bytes, frames: int = 1000, align: int = 1) -> tuple[pipe.PcmFormat, np.ndarray]:
    source = io.BufferedReader(io.BytesIO(stream))
    fmt, size = pipe.read_wav_header(source)
    got = list(pipe.blocks(source, fmt, frames, size, align))
    return fmt, np.concatenate(got) if got else np.zeros((0, fmt.channels))


def test_every_encoding_a_capture_tool_writes_decodes_to_its_samples():
    rng = np.random.default_rng(0)
    x = rng.integers(-2**31, 2**31, size=(3000, 4), dtype=np.int64)
    # ffmpeg -f wav - with 4 channels of 32-bit: WAVE_FORMAT_EXTENSIBLE, which stdlib wave (3.11) refuses
    fmt, got = _read_all(_wav(_fmt(0xFFFE, 4, 48000, 32, extensible_tag=1), x.astype("<i4").tobytes(), 0xFFFFFFFF))
    assert (fmt.rate, fmt.channels, fmt.width, fmt.floating) == (48000, 4, 4, False)
    assert np.array_equal(got, x.astype(np.int32))
    # 24-bit: three bytes a sample, moved to the top of int32 so that its range is int32's
    top = (x[:, :2] >> 8 << 8).astype(np.int32)
    packed = np.stack([(top >> s) & 0xFF for s in (8, 16, 24)], axis=-1).astype(np.uint8).tobytes()
    fmt, got = _read_all(_wav(_fmt(1, 2, 16000, 24), packed))
    assert fmt.width == 3 and np.array_equal(got, top)
    # float, plain and extensible; 8-bit unsigned
    f = rng.uniform(-1, 1, size=(500, 1)).astype(np.float32)
    for body in (_fmt(3, 1, 16000, 32), _fmt(0xFFFE, 1, 16000, 32, extensible_tag=3)):
        fmt, got = _read_all(_wav(body, f.tobytes()))
        assert fmt.floating and np.array_equal(got, f)
    u8 = rng.integers(0, 256, size=(100, 1), dtype=np.uint8)
    assert np.array_equal(_read_all(_wav(_fmt(1, 1, 8000, 8), u8.tobytes()))[1], u8)


def test_lengths_open_or_declared_and_chunks_before_the_data():
    pcm = np.arange(-500, 500, dtype="<i2").reshape(-1, 1)
    for open_size in (0xFFFFFFFF, 0x7FFFFFFF, 0):  # ffmpeg, arecord, some writers: read until the pipe ends
        _, got = _read_all(_wav(_fmt(1, 1, 16000, 16), pcm.tobytes(), open_size, after_data=b"\x01\x02"))
        assert np.array_equal(got[: pcm.size], pcm) and got.shape[0] == pcm.size + 1
    # a declared size is the audio: a trailing chunk (a file piped whole) is not read as samples
    _, got = _read_all(_wav(_fmt(1, 1, 16000, 16), pcm.tobytes(), before_data=b"LIST" + struct.pack("<I", 5)
                            + b"abcde\x00", after_data=b"LIST" + struct.pack("<I", 4) + b"info"))
    assert np.array_equal(got, pcm)


@pytest.mark.parametrize("stream,message", [
    (b"", "is not a WAV stream (it is empty)"),
    (b"ID3\x04 an mp3", "is not a WAV stream (it does not start with RIFF....WAVE)"),
    (_wav(_fmt(1, 0, 16000, 16), b""), "says 0 channels at 16000 Hz"),
    (_wav(_fmt(6, 1, 8000, 8), b""), "WAV format 6 with 8-bit samples"),
    (_wav(_fmt(1, 1, 16000, 12), b""), "WAV format 1 with 12-bit samples"),
    (b"RIFF\xff\xff\xff\xffWAVEfmt ", "the stream ended inside its WAV header"),
    (b"RIFF\xff\xff\xff\xffWAVEdata\xff\xff\xff\xff", "the WAV stream has no fmt chunk before its data"),
    (_wav(b"\x01\x00\x01\x00", b""), "a WAV fmt chunk of 4 bytes"),
    (b"RIFF\xff\xff\xff\xffWAVE" + b"junk" + struct.pack("<I", 1 << 25), "bytes of WAV chunks before the audio"),
])
def test_what_is_not_a_wav_stream_is_one_line(stream, message):
    with pytest.raises(AudioError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        _read_all(stream)
    assert "\n" not in str(err.value)


def test_blocks_are_whole_hops_and_the_rest_comes_at_the_end():
    pcm = np.arange(2500, dtype="<i2")
    source = io.BufferedReader(io.BytesIO(pcm.tobytes() + b"\x07"))  # and half a sample, which is dropped
    got = list(pipe.blocks(source, pipe.PcmFormat(16000, 1, 2), 1000, align=1000))
    assert [b.shape[0] for b in got] == [1000, 1000, 500]
    assert np.array_equal(np.concatenate(got)[:, 0], pcm)


def test_a_signal_while_waiting_for_more_lets_what_arrived_out_first():
    """A stream waits for a whole hop; Ctrl-C or SIGTERM while it waits used to drop the part that had arrived
    (up to a hop: the end of the last command)."""

    class Producer:
        def __init__(self):
            self.chunks = [b"\x01\x00" * 700, b"\x02\x00" * 500]

        def read1(self, n):
            if self.chunks:
                out, rest = self.chunks[0][:n], self.chunks[0][n:]
                self.chunks[:1] = [rest] if rest else []
                return out
            raise KeyboardInterrupt  # the signal, while blocked on the pipe

    fmt = pipe.PcmFormat(16000, 1, 2)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for block in pipe.blocks(Producer(), fmt, 1000, align=1000):
            got.append(block)
    assert [b.shape[0] for b in got] == [1000, 200]  # a whole hop, then the rest before the signal goes on
    assert got[1][:, 0].tolist() == [2] * 200
