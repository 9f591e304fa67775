"""Audio input for every entry point: files soundfile reads or arrays, any rate, any channel count.

Output is always float32 mono at the requested rate. Resampling uses soxr (a well-kept resampler) rather than
hand-written filters.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np

from megaedge.errors import AudioError, AudioTooLongError, NonFiniteAudioError

TARGET_RATE = 16000
MAX_RATE = 768_000  # the highest rate audio interfaces record at; anything above is a wrong argument
MIN_RATE = 1000  # speech needs a few kHz of band (telephones record at 8000); below this it is a wrong argument
# Reading and resampling hold a few float32 copies of the audio at once: refused up front when they would not fit
# in the memory this machine has free, instead of a MemoryError (or the OOM killer) after minutes.
COPIES_IN_MEMORY = 3


MAX_CHANNELS = 32  # more than any microphone array here; a longer axis is samples


def channel_axis(shape: tuple[int, int], known: int | None = None) -> int:
    """The axis of a 2-D block that holds channels: 1 for (samples, channels) as soundfile and sounddevice give,
    0 for (channels, samples) as librosa and torchaudio give. The channels axis is the one of at most
    MAX_CHANNELS when the other is longer; with both longer (a large microphone array), the shorter one. A block
    too short to tell (both axes that short) keeps ``known`` (a stream's earlier blocks), or else its shorter axis
    is read as channels (a block of fewer samples than channels is not a thing devices give), and a square one
    as (samples, channels)."""
    rows, cols = shape
    if rows > MAX_CHANNELS and cols > MAX_CHANNELS:
        return 0 if rows < cols else 1
    if cols <= MAX_CHANNELS < rows:
        return 1
    if rows <= MAX_CHANNELS < cols:
        return 0
    if known is not None:
        return known
    return 0 if rows < cols else 1


def to_mono(samples: np.ndarray, known_axis: int | None = None, name: str = "audio") -> np.ndarray:
    """(n,), (n, channels) or (channels, n) -> (n,) by averaging channels (``channel_axis`` tells the layouts
    apart)."""
    if samples.ndim == 1:
        return samples
    if samples.ndim == 2:
        return samples.mean(axis=channel_axis(samples.shape, known_axis))
    raise AudioError(f"{name}: the array has {samples.ndim} dimensions; expected (samples,), (samples, channels) or "
                     "(channels, samples)")


def resample(samples: np.ndarray, rate: int, target: int = TARGET_RATE) -> np.ndarray:
    if rate == target:
        return samples.astype(np.float32, copy=False)
    if rate <= 0:
        raise AudioError(f"sample rate {rate} Hz is not positive")
    import soxr

    return soxr.resample(samples.astype(np.float32, copy=False), rate, target, quality="HQ").astype(np.float32)


def check_finite(samples: np.ndarray, name: str) -> None:
    if not np.isfinite(samples).all():
        bad = int(np.size(samples) - np.isfinite(samples).sum())
        raise NonFiniteAudioError(f"{name}: {bad} samples are NaN or Inf; clean the audio before transcribing it")


# Float audio is read as [-1, 1]. Peaks a little over 1 happen (a mix, a resampler's overshoot of clipped audio);
# beyond this one the samples are almost surely integer PCM turned into floats without scaling, which the model
# hears as another, plausible command rather than as noise.
FLOAT_PEAK_LIMIT = 4.0


def as_float(samples: np.ndarray, name: str = "audio", whole: bool = False, check_scale: bool = True,
             watch: WidthWatch | None = None) -> np.ndarray:
    """float32 samples in [-1, 1]: integer PCM scaled by its type's range (int16 / 32768), floats as they are.

    Refused (``check_scale``), as the usual mistakes of an embedder: floats peaking over FLOAT_PEAK_LIMIT, and
    (``whole``: a whole recording; a stream's blocks, one of which may be a quiet moment, through ``watch``) 32- or
    64-bit integers whose peak fits a narrower type: PCM of that type kept in a wider array (a list of ints becomes
    int64), which would be read as near silence. A file's samples are what its format says: not judged."""
    path = "a file path, or " if whole else ""
    if not whole and isinstance(samples, (str, os.PathLike)):
        raise AudioError(f"{name}: {os.fspath(samples)!r} is a path; a stream takes samples: read the file first "
                         "(soundfile.read), or pass the path to transcribe")
    if isinstance(samples, memoryview) and samples.format not in ("B", "b", "c"):
        samples = np.asarray(samples)  # a typed view (array.array('f'), a numpy buffer): samples of its type
    if isinstance(samples, (bytes, bytearray, memoryview)):
        raise AudioError(f"{name}: {memoryview(samples).nbytes} bytes are not samples; pass {path}samples decoded "
                         "from them (numpy.frombuffer(data, '<i2') for raw 16-bit PCM, "
                         "soundfile.read(io.BytesIO(data)) for a file's bytes)")
    try:
        arr = np.asarray(samples)
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: a tensor that needs .detach() first
        raise AudioError(f"{name}: a {type(samples).__name__} is not audio; pass {path}an array of samples") from exc
    if arr.ndim == 0 and arr.dtype.kind in "iuf":
        raise AudioError(f"{name}: {samples!r} is one number, not audio; pass {path}an array of samples")
    if arr.dtype.kind == "i":
        if check_scale and whole and arr.dtype.itemsize > 2 and arr.size:
            _check_integer_width(arr, name)
        elif check_scale and watch is not None:
            watch.see(arr, name)
        return arr.astype(np.float32) / float(np.iinfo(arr.dtype).max + 1)
    if arr.dtype.kind == "u":  # unsigned PCM (8-bit WAV) is offset by half its range
        half = float(np.iinfo(arr.dtype).max + 1) / 2
        return (arr.astype(np.float32) - half) / half
    if arr.dtype.kind != "f":
        what = f"a {type(samples).__name__}" if arr.dtype.kind == "O" else f"samples of type {arr.dtype}"
        raise AudioError(f"{name}: {what} is not audio; pass {path}float or integer PCM samples")
    if check_scale and arr.size:
        peak = max(float(arr.max()), -float(arr.min()))  # NaN or inf: check_finite names those samples
        if FLOAT_PEAK_LIMIT < peak < np.inf:
            raise AudioError(f"{name}: float samples peak at {peak:.6g}, but float audio is read in [-1, 1]: "
                             "integer PCM converted to float? divide 16-bit samples by 32768, or pass the "
                             "integer array itself")
    return arr.astype(np.float32, copy=False)


def _check_integer_width(arr: np.ndarray, name: str) -> None:
    """Refuse 32/64-bit integers whose peak fits 16 bits (or, in int64, 32 bits): read at their type's scale they
    would be near silence. A 24-bit recording kept in the low bits of int32 is named too: it cannot be told from a
    quiet 16-bit one, and neither is what int32 full scale means."""
    _check_peak(max(int(arr.max()), -int(arr.min())), arr.dtype, name)  # no int64 copy of the whole array


class WidthWatch:
    """A stream's integer blocks wider than 16 bits, judged together (``as_float``'s check of a whole recording):
    one block may be a quiet moment, but a second of them whose peak fits 16 bits is 16-bit PCM in a wide array
    (``pcm.tolist()`` makes int64), which would be read as near silence. int64 is judged from its first block: no
    device records at that width. Digital silence is never judged."""

    JUDGE_AFTER = 16000  # samples

    def __init__(self):
        self.dtype, self.peak, self.samples, self.judged = None, 0, 0, False

    def see(self, arr: np.ndarray, name: str) -> None:
        if arr.dtype.kind != "i" or arr.dtype.itemsize <= 2 or not arr.size:
            return
        if arr.dtype != self.dtype:
            self.dtype, self.peak, self.samples, self.judged = arr.dtype, 0, 0, False
        if self.judged:
            return
        self.peak = max(self.peak, int(arr.max()), -int(arr.min()))
        self.samples += arr.size
        if self.peak and (arr.dtype.itemsize == 8 or self.samples >= self.JUDGE_AFTER):
            _check_peak(self.peak, arr.dtype, name)
            self.judged = self.samples >= self.JUDGE_AFTER


def _check_peak(peak: int, dtype: np.dtype, name: str) -> None:
    full = np.iinfo(dtype).max
    if peak == 0:
        return  # digital silence is silence in any width
    if peak <= 32768:
        fix = "samples.astype(numpy.int16) for 16-bit values, samples * 256 for 24-bit values in int32"
    elif dtype.itemsize == 8 and peak <= 2**31:
        fix = "samples.astype(numpy.int32) for 32-bit values"
    else:
        return
    raise AudioError(f"{name}: {dtype} samples peak at {peak} of {full} ({20 * np.log10(peak / full):.0f} "
                     f"dBFS): PCM of a narrower type in a wider array, which would be read as near silence; pass "
                     f"{fix}, or floats in [-1, 1]")


def check_rate(rate, what: str) -> int:
    """A sample rate in whole Hz, MIN_RATE-MAX_RATE; a float with no fraction counts (sounddevice reports 48000.0).
    A 1 Hz file of 20 kB is 5.5 hours at 16 kHz: far below MIN_RATE the rate is a mistake, not a recording."""
    whole = isinstance(rate, (int, np.integer)) or (isinstance(rate, (float, np.floating)) and
                                                      float(rate).is_integer())
    if isinstance(rate, bool) or not whole or not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"{what} {rate!r} is not a rate in whole Hz ({MIN_RATE}-{MAX_RATE}); pass the rate the "
                         "samples were recorded at, e.g. 16000")
    return int(rate)


def available_bytes() -> int | None:
    """Memory this machine has free for new allocations (Linux: MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(frames: int, channels: int, rate: int, name: str, target: int = TARGET_RATE, held: int = 0) -> None:
    """One line when reading ``frames`` of audio (as a file's header says) and resampling it to ``target`` would
    need more memory than is free (``held``: bytes of it already read, no longer counted as free)."""
    need = 4 * COPIES_IN_MEMORY * (frames * max(channels, 1) + frames * target // max(rate, 1))
    free = available_bytes()
    if free is not None:
        free += held
    if free is not None and need > free:
        hours = frames / max(rate, 1) / 3600
        raise AudioError(f"{name} {hours:.1f} h of audio ({frames} frames at {rate} Hz): ~{need / 2**30:.1f} "
                         f"GiB to read, more than the {free / 2**30:.1f} GiB free here; split it, e.g. ffmpeg -i IN "
                         "-f segment -segment_time 600 part%03d.wav")


def prepare(samples: np.ndarray, rate: int, name: str = "audio", target: int = TARGET_RATE,
            check_scale: bool = True, check_memory: bool = True) -> np.ndarray:
    """Validate an in-memory array and bring it to float32 mono at ``target`` Hz (``check_memory``: refuse one
    whose resampling would not fit; a file's header was checked before it was read)."""
    rate = check_rate(rate, f"{name}: sample rate")
    if check_memory and rate != target and hasattr(samples, "__len__"):
        check_fits(len(samples), 1, rate, f"{name}:", target)
    arr = to_mono(as_float(samples, name, whole=True, check_scale=check_scale), name=name)
    check_finite(arr, name)
    if arr.size == 0:
        raise AudioError(f"{name}: the audio is empty (0 samples)")
    return resample(arr, rate, target)


def read_file(path: str | os.PathLike, target: int = TARGET_RATE) -> np.ndarray:
    """Read any format soundfile understands; raise AudioError with the file name on any problem."""
    p = Path(path)
    return _decode(str(p), check_readable(p), str(p), target)


def read_bytes(data: bytes, name: str, target: int = TARGET_RATE, max_seconds: float | None = None,
               max_samples: int | None = None, info=None) -> np.ndarray:
    """``read_file`` for a file's bytes held in memory (an upload): the same checks and decoding, so the same
    samples, without the audio ever touching a disk; ``name`` is what messages call it. ``max_seconds`` and
    ``max_samples`` (frames x channels) bound what is decoded (AudioTooLongError), a file of unknown length
    while it is read: a few kB of compressed silence decode to hours of audio. ``info``: what ``check_bytes``
    returned for ``data`` already (a caller that checked before queueing), so that it is not probed twice."""
    info = check_bytes(data, name) if info is None else info
    return _decode(io.BytesIO(data), info, name, target, max_seconds, max_samples)


def check_decoded_size(info, name: str, max_seconds: float | None, max_samples: int | None) -> None:
    """AudioTooLongError when a file of known length holds more than ``max_seconds`` or ``max_samples``."""
    if unknown_length(info):
        return
    _check_size(int(info.frames), int(info.channels), int(info.samplerate), name, max_seconds, max_samples)


def _check_size(frames: int, channels: int, rate: int, name: str, max_seconds, max_samples, known: bool = True):
    """AudioTooLongError past a bound: ``frames`` is the whole file's when ``known``, else what was read so far."""
    layout = f"({rate} Hz x {channels} channels)"
    fix = "decoded per request: downmix or resample it (ffmpeg -i IN -ac 1 -ar 16000 OUT.flac)"
    if max_seconds is not None and frames > max_seconds * rate:
        if known:
            raise AudioTooLongError(f"{name}: holds {frames / rate:.1f} s of audio, more than {max_seconds:g} s")
        raise AudioTooLongError(f"{name}: of unknown length, it holds more than {max_seconds:g} s of audio")
    if max_samples is not None and frames * channels > max_samples:
        if known:
            raise AudioTooLongError(f"{name}: holds {frames * channels} samples {layout}, more than the "
                                    f"{max_samples} {fix}")
        raise AudioTooLongError(f"{name}: of unknown length, it holds more than the {max_samples} samples {layout} "
                                f"{fix}")


def _decode(source, info, name: str, target: int, max_seconds: float | None = None,
            max_samples: int | None = None) -> np.ndarray:
    import soundfile as sf

    try:
        check_rate(info.samplerate, f"{name}: sample rate")
        check_decoded_size(info, name, max_seconds, max_samples)
        if not unknown_length(info):
            check_fits(int(info.frames), int(info.channels), int(info.samplerate),
                       f"{name}: its header says it holds", target)
        mono, rate = _read_mono(source, info, name, target, max_seconds, max_samples)
    except (RuntimeError, sf.LibsndfileError, TypeError, ValueError) as exc:
        raise AudioError(f"{name}: cannot read audio ({_first_line(exc)}); use wav/flac/ogg/mp3") from exc
    return prepare(mono, int(rate), name=name, target=target, check_scale=False, check_memory=False)


def unknown_length(info) -> bool:
    """Whether a file's header leaves its length open (SF_COUNT_MAX): a FLAC or WAV written by a streaming encoder
    (``arecord | flac -``, ffmpeg to a pipe) that could not go back to fill it in."""
    return info.frames >= 2**63 - 1


READ_BLOCK = 1 << 18  # frames per read of a file of unknown length: 16 s at 16 kHz


def _read_mono(source, info, name: str, target: int, max_seconds: float | None = None,
               max_samples: int | None = None) -> tuple[np.ndarray, int]:
    """The file's samples mixed to mono, read a block at a time: only the mono copy is ever whole (a 10-minute
    48 kHz stereo upload held twice its size as float32 frames before its mix).

    A file of unknown length is read until it ends, checked against the size limits and free memory as it grows:
    soundfile's whole-file read sizes its array from the header (an exabyte there), and its block reads seek past
    each block, which libsndfile refuses at the end of such a file, so its blocks are read as from a pipe."""
    import soundfile as sf

    open_ended = unknown_length(info)
    # a known length is filled in place; an open one is kept in blocks, joined at the end
    whole = None if open_ended else np.empty(int(info.frames), np.float32)
    parts, frames = [], 0
    with sf.SoundFile(source) as f:
        if open_ended:
            f.seekable = lambda: False  # read on from where the last read ended; never seek (see above)
        while True:
            block = f.read(READ_BLOCK, dtype="float32", always_2d=True)
            if not len(block):
                break
            # soundfile says the layout, (frames, channels): nothing to guess
            mixed = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
            if whole is not None:
                whole[frames : frames + len(mixed)] = mixed
            frames += len(mixed)
            if whole is None:
                parts.append(mixed)
                _check_size(frames, f.channels, f.samplerate, name, max_seconds, max_samples, known=False)
                check_fits(frames, f.channels, f.samplerate, f"{name}: of unknown length, it holds at least", target,
                           held=4 * frames)
        rate = f.samplerate
    if not frames:
        raise AudioError(f"{name}: the audio is empty (0 samples)")
    return (np.concatenate(parts) if whole is None else whole[:frames]), rate


def _first_line(exc: BaseException) -> str:
    """The reason in a reader's error, without the object it was opened from (from memory: a heap address, which
    a server would send to its client)."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^Error opening <[^>]*>: ", "", line)


def _wav_truncation(head: bytes, size: int, name: str) -> str | None:
    """For RIFF/WAVE files (``head``: the first 64 KiB of ``size`` bytes): a message when the data chunk is shorter
    than its header says (a cut-off copy).

    libsndfile silently shortens such files to what is present, which would transcribe half a recording.
    """
    import struct

    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk, length = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk == b"data":
            have = size - (pos + 8)
            if length != 0xFFFFFFFF and have < length:
                return f"{name}: truncated WAV: the header promises {length} bytes of audio, the file has {have}; copy it again"
            return None
        pos += 8 + length + (length & 1)
    return None


def check_readable(path: str | os.PathLike):
    """Fail now (one line) if ``path`` cannot be transcribed: missing, a directory, unreadable, truncated, empty.
    Returns soundfile's description of it (rate, channels, frames as its header says)."""
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: no such file")
    if p.is_dir():
        raise AudioError(f"{p}: is a directory, expected an audio file")
    if p.is_file() and p.stat().st_size == 0:
        raise AudioError(f"{p}: the file is empty (0 bytes)")
    with open(p, "rb") as f:
        head = f.read(1 << 16)
    return _describe(str(p), head, p.stat().st_size, str(p))


def check_bytes(data: bytes, name: str, whole: bool = True):
    """``check_readable`` for a file's bytes held in memory (``whole=False``: only its start, whose header is
    judged; its length and truncation cannot be)."""
    if not data:
        raise AudioError(f"{name}: the file is empty (0 bytes)")
    return _describe(io.BytesIO(data), data[: 1 << 16], len(data), name, whole)


def _describe(source, head: bytes, size: int, name: str, whole: bool = True):
    import soundfile as sf

    try:
        info = sf.info(source)
    except (RuntimeError, sf.LibsndfileError, TypeError, ValueError) as exc:
        raise AudioError(f"{name}: cannot read audio ({_first_line(exc)}); use wav/flac/ogg/mp3") from exc
    problem = _wav_truncation(head, size, name) if whole else None
    if problem:
        raise AudioError(problem)
    if info.frames == 0 and whole:
        raise AudioError(f"{name}: the audio is empty (0 samples)")
    return info


def load(source, rate: int = TARGET_RATE, target: int = TARGET_RATE) -> np.ndarray:
    """``source`` is a path (read at its own rate), or an array at ``rate`` Hz (16 kHz unless told)."""
    if isinstance(source, bytes) and len(source) < 4096 and os.path.isfile(source):  # a path given as bytes
        source = os.fsdecode(source)
    if isinstance(source, (str, os.PathLike)):
        return read_file(source, target)
    return prepare(source, TARGET_RATE if rate is None else rate, target=target)
