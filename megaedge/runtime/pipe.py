"""PCM from a pipe: a WAV stream as ``arecord -t wav`` and ``ffmpeg -f wav -`` write one, or headerless PCM.

A pipe cannot seek, which libsndfile needs, and the standard library's ``wave`` (before Python 3.12) refuses
WAVE_FORMAT_EXTENSIBLE, what ffmpeg writes for more than two channels or more than 16 bits, and float samples;
it also takes a streaming header's 0xFFFFFFFF data size literally and stops after 4 GiB. So the header is read
here: RIFF chunks up to ``data``, the ``fmt `` chunk's encoding, then the samples as they come, read with
``read1`` so that a signal never discards audio already received.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from megaedge.errors import AudioError

# Data sizes a streaming writer leaves (ffmpeg 0xFFFFFFFF, arecord near 0x7FFFFFFF, some 0): read until the pipe
# ends. A real file that large piped whole is read to its end as well, trailing chunks and all.
OPEN_LENGTH = 0x7FFF0000
MAX_SKIPPED = 1 << 24  # bytes of chunks before ``data`` (LIST, fact, ...) read and dropped; beyond, not a stream
PCM, FLOAT, EXTENSIBLE = 1, 3, 0xFFFE


@dataclass(frozen=True)
class PcmFormat:
    rate: int
    channels: int
    width: int  # bytes per sample
    floating: bool = False

    @property
    def frame(self) -> int:
        return self.channels * self.width

    def decode(self, data: bytes) -> np.ndarray:
        """Whole frames of ``data`` -> samples [frames, channels], integer PCM in a type whose range is its scale
        (24-bit moved to the top of int32) or float."""
        if self.floating:
            return np.frombuffer(data, "<f4" if self.width == 4 else "<f8").reshape(-1, self.channels)
        if self.width == 3:
            raw = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
            return ((raw[:, 0] << 8) | (raw[:, 1] << 16) | (raw[:, 2] << 24)).reshape(-1, self.channels)
        return np.frombuffer(data, {1: "u1", 2: "<i2", 4: "<i4"}[self.width]).reshape(-1, self.channels)


def _read_exactly(source: BinaryIO, n: int, what: str) -> bytes:
    data = b""
    while len(data) < n:
        more = source.read(n - len(data))
        if not more:
            raise AudioError(f"{what}: the stream ended inside its WAV header")
        data += more
    return data


def read_wav_header(source: BinaryIO, what: str = "standard input") -> tuple[PcmFormat, int | None]:
    """The WAV header at the start of ``source`` -> (format, bytes of audio, or None when the length is open)."""
    head = source.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        got = "it is empty" if not head else "it does not start with RIFF....WAVE"
        raise AudioError(f"{what} is not a WAV stream ({got})")
    fmt, skipped = None, 0
    while True:
        chunk, size = struct.unpack("<4sI", _read_exactly(source, 8, what))
        if chunk == b"data":
            break
        if chunk == b"fmt ":
            body = _read_exactly(source, size + (size & 1), what)
            fmt = _format(body, what)
            continue
        skipped += size + (size & 1)
        if skipped > MAX_SKIPPED:
            raise AudioError(f"{what}: {skipped} bytes of WAV chunks before the audio; not a stream")
        _read_exactly(source, size + (size & 1), what)
    if fmt is None:
        raise AudioError(f"{what}: the WAV stream has no fmt chunk before its data")
    open_length = size >= OPEN_LENGTH or size == 0
    return fmt, None if open_length else size


def _format(body: bytes, what: str) -> PcmFormat:
    if len(body) < 16:
        raise AudioError(f"{what}: a WAV fmt chunk of {len(body)} bytes")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
    if tag == EXTENSIBLE and len(body) >= 26:
        tag = struct.unpack("<H", body[24:26])[0]  # the sub-format GUID starts with the plain format's tag
    if channels < 1 or rate < 1:
        raise AudioError(f"{what}: the WAV header says {channels} channels at {rate} Hz")
    if tag == PCM and bits in (8, 16, 24, 32):
        return PcmFormat(rate, channels, bits // 8)
    if tag == FLOAT and bits in (32, 64):
        return PcmFormat(rate, channels, bits // 8, floating=True)
    raise AudioError(f"{what}: WAV format {tag} with {bits}-bit samples; send integer PCM (8, 16, 24 or 32-bit) "
                     "or float (32, 64-bit), e.g. arecord -f S16_LE, ffmpeg -c:a pcm_s16le")


def blocks(source: BinaryIO, fmt: PcmFormat, frames: int, data_bytes: int | None = None,
           align: int = 1) -> Iterator[np.ndarray]:
    """Samples [n, channels] as they arrive, at most ``frames`` a block, until the pipe (or ``data_bytes``) ends.

    Blocks hold whole multiples of ``align`` frames (a stream's hop: the cuts a file's or a microphone's blocks
    make), the rest waits for more; at the end, or when a signal interrupts the wait for more, the rest comes out
    before the signal goes on, so nothing received is lost. A trailing partial frame is dropped."""
    read = source.read1 if hasattr(source, "read1") else source.read
    left, pending = data_bytes, b""
    unit = fmt.frame * max(1, align)
    try:
        while left is None or left > 0:
            want = max(unit, fmt.frame * frames // unit * unit) - len(pending) % unit
            data = read(want if left is None else min(want, left))
            if not data:
                break
            if left is not None:
                left -= len(data)
            pending += data
            usable = len(pending) // unit * unit
            if usable:
                block, pending = pending[:usable], pending[usable:]
                yield fmt.decode(block)
    except KeyboardInterrupt:  # Ctrl-C, or a SIGTERM the caller turns into one: what arrived still counts
        whole = len(pending) // fmt.frame * fmt.frame
        if whole:
            yield fmt.decode(pending[:whole])
        raise
    whole = len(pending) // fmt.frame * fmt.frame
    if whole:
        yield fmt.decode(pending[:whole])
