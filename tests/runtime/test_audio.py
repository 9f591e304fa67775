import re

import numpy as np
import pytest
import soundfile as sf

from megaedge.errors import AudioError
from megaedge.runtime import audio
from tests.conftest import forget_flac_length


def test_stereo_44k_file_becomes_mono_16k(tmp_path):
    t = np.arange(44100) / 44100
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([left, left], axis=1), 44100)
    out = audio.load(path)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 16000) <= 2
    spectrum = np.abs(np.fft.rfft(out[2000:14000]))
    peak_hz = np.argmax(spectrum) * 16000 / 12000
    assert abs(peak_hz - 440) < 3


def test_int16_array_is_scaled():
    out = audio.load(np.array([0, 16384, -32768], dtype=np.int16), rate=16000)
    np.testing.assert_allclose(out, [0.0, 0.5, -1.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_rejected_with_name(tmp_path, bad):
    x = np.zeros(1600, dtype=np.float32)
    x[10] = bad
    with pytest.raises(AudioError, match="NaN or Inf"):
        audio.load(x, rate=16000)


def test_missing_truncated_and_empty_files(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        audio.load(tmp_path / "nope.wav")
    good = tmp_path / "good.wav"
    sf.write(good, np.zeros(16000, dtype=np.float32), 16000)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:30])
    with pytest.raises(AudioError, match="truncated.wav"):
        audio.load(truncated)
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    with pytest.raises(AudioError, match="cannot read audio"):
        audio.load(text)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty"):
        audio.load(empty)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])
def test_bytes_in_memory_read_as_the_same_file_on_disk(tmp_path, fmt):
    """The server decodes uploads from memory: the samples, and every refusal, are a file's on disk."""
    from tests.conftest import speechlike

    path = tmp_path / f"clip.{fmt}"
    sf.write(path, np.stack([speechlike(2.0, rate=44100)] * 2, axis=1), 44100)
    np.testing.assert_array_equal(audio.read_bytes(path.read_bytes(), "clip"), audio.read_file(path))
    assert audio.check_bytes(path.read_bytes(), "clip").frames == sf.info(str(path)).frames


def test_bytes_in_memory_are_refused_as_a_file_is(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, np.zeros(16000, dtype=np.float32), 16000)
    cases = {b"": "'up.wav' is empty|the file is empty", good.read_bytes()[:-100]: "truncated WAV",
             b"not audio": "cannot read audio", good.read_bytes()[:44]: "empty|truncated"}
    for data, message in cases.items():
        with pytest.raises(AudioError, match=message) as err:
            audio.read_bytes(data, "'up.wav'")
        assert str(err.value).startswith("'up.wav'") and "\n" not in str(err.value)


def test_all_zero_audio_is_valid():
    assert audio.load(np.zeros(8000, dtype=np.float32), rate=16000).size == 8000


def test_an_empty_file_is_named_empty(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty.wav: the file is empty \(0 bytes\)"):
        audio.read_file(empty)


def test_a_file_with_many_channels_reads_as_soundfile_lays_it_out(tmp_path):
    """soundfile gives (frames, channels): a 64-channel file and a 20-frame 40-channel one are mixed over their
    channels, not guessed at."""
    rng = np.random.default_rng(0)
    for frames, channels in ((16000, 64), (20, 40)):
        data = rng.uniform(-0.5, 0.5, (frames, channels)).astype(np.float32)
        path = tmp_path / f"{channels}.wav"
        sf.write(str(path), data, 16000, subtype="FLOAT")
        got = audio.read_file(path)
        assert got.shape == (frames,) and np.allclose(got, data.mean(axis=1), atol=1e-6)


def test_the_usual_scale_mistakes_are_refused_in_one_line(tmp_path):
    """int16 PCM passed as floats (the model hears another plausible command), 16-bit values in an int32 array or a
    list of ints (read as near silence), and floats so large they overflow float32 are refused, naming the fix."""
    import soundfile as sf

    from megaedge.runtime import audio

    pcm = (np.sin(np.arange(16000) / 5.0) * 20000).astype(np.int16)
    pcm[100] = 20000
    cases = [(pcm.astype(np.float32), "float samples peak at 20000.*divide 16-bit samples by 32768"),
             (pcm.astype(np.int32), "int32 samples peak at 20000 of 2147483647.*astype\\(numpy.int16\\)"),
             (pcm.tolist(), "int64 samples peak at 20000"),
             (np.array([1e300, 0.0]), "float samples peak at 1e\\+300")]
    for samples, message in cases:
        with pytest.raises(AudioError, match=message):
            audio.load(samples)
    with pytest.raises(AudioError, match="float samples peak at 20000"):
        audio.as_float(pcm.astype(np.float32), "stream input")  # a stream's block too
    audio.as_float(np.full(10, 100, np.int32), "stream input")  # but a quiet int32 block of a stream is fine
    assert audio.load(pcm).dtype == np.float32 and audio.load(pcm / 32768.0 * 3).max() > 1.8  # hot float: kept
    assert not audio.load(np.zeros(100, np.int32)).any()  # digital silence in int32 is silence
    with pytest.raises(AudioError, match="int64 samples peak at 70000 .*astype\\(numpy.int32\\)"):
        audio.load((pcm.astype(np.int64) * 0 + 70000).tolist())  # 32-bit values in a list: int64
    with pytest.raises(AudioError, match="samples \\* 256 for 24-bit values in int32"):
        audio.load(np.full(100, 12582, np.int32))
    path = tmp_path / "scaled.wav"
    sf.write(path, pcm.astype(np.float32) / 32768 * 5, 16000, subtype="FLOAT")  # a float file is what it says
    assert audio.load(path).max() > 3
    sf.write(path, pcm, 16000)
    assert np.array_equal(audio.load(bytes(path)), audio.load(path))  # a path given as bytes


def test_a_streams_wide_integer_blocks_are_judged_together():
    """A stream's blocks: one quiet int32 block may be a quiet moment, but a second of int32 whose peak fits 16 bits
    is 16-bit PCM in a wide array (streams took it and gave an empty final); a list of ints (int64) is judged
    from its first block; digital silence never; real 32-bit PCM never."""
    from megaedge.runtime import audio

    pcm = (np.sin(np.arange(16000) / 5.0) * 20000).astype(np.int16)
    pcm[100] = 20000
    watch = audio.WidthWatch()
    for block in np.split(pcm.astype(np.int32), 10)[:9]:
        audio.as_float(block, "stream input", watch=watch)  # 0.9 s: could still be a quiet moment
    with pytest.raises(AudioError, match="stream input: int32 samples peak at 20000 .*astype\\(numpy.int16\\)"):
        audio.as_float(pcm[-1600:].astype(np.int32), "stream input", watch=watch)
    with pytest.raises(AudioError, match="int64 samples peak at 20000"):
        audio.as_float(pcm[:160].tolist(), "stream input", watch=audio.WidthWatch())
    watch = audio.WidthWatch()
    for _ in range(30):
        audio.as_float(np.zeros(1600, np.int32), "stream input", watch=watch)  # 3 s of a muted microphone
    loud = pcm.astype(np.int32) << 16  # 16-bit audio at int32's full scale
    for block in np.split(loud, 10):
        audio.as_float(block, "stream input", watch=watch)
    assert watch.judged
    audio.as_float(np.full(1600, 3, np.int32), "stream input", watch=watch)  # later quiet blocks: fine


def test_a_typed_memoryview_is_samples_and_a_byte_view_is_bytes():
    """A float32 view (array.array('f'), a buffer protocol object) was refused as '49510 bytes' (its item count)."""
    import array

    from megaedge.runtime import audio

    assert audio.as_float(memoryview(array.array("f", [0.25, -0.5]))).tolist() == [0.25, -0.5]
    assert audio.as_float(memoryview(array.array("h", [16384]))).tolist() == [0.5]
    with pytest.raises(AudioError, match="stream input: 8 bytes are not samples"):
        audio.as_float(memoryview(array.array("f", [0.0, 0.0])).cast("B"), "stream input")


def test_objects_that_are_not_audio_are_named():
    from megaedge.runtime import audio

    with pytest.raises(AudioError, match="a NoneType is not audio; pass a file path, or"):
        audio.load(None)
    with pytest.raises(AudioError, match="a dict is not audio"):
        audio.load({"samples": [0.0]})


def test_audio_that_would_not_fit_in_memory_is_one_line_before_reading(tmp_path, monkeypatch):
    """A 20 kB file at 1 Hz was 5.5 h of audio at 16 kHz (2.6 GB, hours of decoding), and a FLAC whose header
    claims 2**36 samples made soundfile allocate 256 GiB (a traceback): rates below MIN_RATE are refused, and so is
    audio whose reading and resampling would need more memory than is free, before any of it is read."""
    import soundfile as sf

    from megaedge.runtime import audio

    with pytest.raises(AudioError, match=r"sample rate 999 is not a rate in whole Hz \(1000-768000\)"):
        audio.load(np.zeros(100, np.float32), 999)
    assert audio.load(np.zeros(100, np.float32), 1000).size == 1600
    x = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    flac = tmp_path / "a.flac"
    sf.write(str(flac), x, 16000)
    raw = bytearray(flac.read_bytes())
    fields = int.from_bytes(raw[18:26], "big")  # STREAMINFO: rate, channels, bits, then 36 bits of total samples
    raw[18:26] = ((fields & ~((1 << 36) - 1)) | ((1 << 36) - 1)).to_bytes(8, "big")
    lying = tmp_path / "lying.flac"
    lying.write_bytes(bytes(raw))
    with pytest.raises(AudioError, match=r"lying.flac: its header says it holds 1193.0 h of audio .* split it"):
        audio.load(str(lying))
    assert audio.load(str(flac)).size == 16000
    monkeypatch.setattr(audio, "available_bytes", lambda: 100_000)  # a machine with 100 kB free
    with pytest.raises(AudioError, match="a.flac: its header says it holds 0.0 h of audio .* more than the"):
        audio.load(str(flac))
    with pytest.raises(AudioError, match="audio: 0.0 h of audio .* more than the"):
        audio.load(x, 8000)


def unknown_length_flac(path, seconds: float = 20.0) -> np.ndarray:
    """Write a FLAC as a streaming encoder does (``arecord | flac -``: STREAMINFO's total samples 0, "unknown");
    returns the samples it holds, as read before its length was taken out."""
    x = (np.random.default_rng(1).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
    sf.write(str(path), x, 16000)
    held = sf.read(str(path), dtype="float32")[0]
    forget_flac_length(path)
    return held


def test_decoding_is_bounded_in_seconds_and_in_samples_before_reading(tmp_path):
    """A server's bounds (--max-audio-seconds, and that much 48 kHz stereo in samples) refuse a file whose header
    says it holds more, before any of it is decoded."""
    from megaedge.errors import AudioTooLongError

    path = tmp_path / "wide.flac"
    sf.write(str(path), np.zeros((48000 * 3, 8), np.int16), 48000)
    with pytest.raises(AudioTooLongError, match=r"'up': holds 3.0 s of audio, more than 2 s"):
        audio.read_bytes(path.read_bytes(), "'up'", max_seconds=2)
    with pytest.raises(AudioTooLongError, match=r"'up': holds 1152000 samples \(48000 Hz x 8 channels\), more than "
                                                r"the 100000 decoded per request: downmix or resample it"):
        audio.read_bytes(path.read_bytes(), "'up'", max_samples=100_000)
    assert audio.read_bytes(path.read_bytes(), "'up'", max_seconds=3, max_samples=48000 * 3 * 8).size == 48000


def test_a_flac_of_unknown_length_is_read_to_its_end(tmp_path, monkeypatch):
    """soundfile sized its array from the header (an exabyte: 'array is too big'), and its block reads fail at the
    end of such a file: it is read to its end, from disk and from memory, as the same samples a whole FLAC gives;
    the free-memory check runs as it grows."""
    from megaedge.runtime import audio

    path = tmp_path / "streamed.flac"
    want = unknown_length_flac(path)  # 20 s: more than one READ_BLOCK
    assert audio.unknown_length(sf.info(str(path)))
    np.testing.assert_array_equal(audio.read_file(path), want)
    np.testing.assert_array_equal(audio.read_bytes(path.read_bytes(), "up"), want)
    monkeypatch.setattr(audio, "available_bytes", lambda: 4 * 3 * audio.READ_BLOCK * 3 // 2)
    with pytest.raises(AudioError, match="streamed.flac: of unknown length, it holds at least .* more than the") as err:
        audio.read_file(path)
    read = int(re.search(r"\((\d+) frames at", str(err.value)).group(1))
    assert read == audio.READ_BLOCK < want.size  # refused after the first block, not once the file was read


def test_a_file_is_checked_against_free_memory_once_before_reading(tmp_path, monkeypatch):
    """The check ran again after the samples were read and mixed (counting them twice): 600 s at 48 kHz that fit
    were refused after the whole file was read."""
    from megaedge.runtime import audio

    path = tmp_path / "a.wav"
    sf.write(str(path), np.zeros(48000, np.float32), 48000)
    calls = []
    real = audio.check_fits
    monkeypatch.setattr(audio, "check_fits", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert audio.load(str(path)).size == 16000
    assert [c[:3] for c in calls] == [(48000, 1, 48000)]
