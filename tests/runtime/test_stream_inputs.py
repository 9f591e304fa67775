"""Streams take input as offline transcription does: any rate (the resampler flushed at the end), integer PCM
scaled, a rate always given; the same tokens give the same text; routes a bundle cannot take are refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from megaedge.errors import MegaedgeError
from megaedge.runtime.streaming import StreamOptions

EXACT = StreamOptions.preset("exact")


@pytest.fixture(scope="module")
def clips():
    from megaedge import fixture
    from megaedge.runtime.evaluate import read_set

    return [item["path"] for item in read_set(fixture.heldout_manifest())[::4]]


@pytest.fixture(scope="module")
def merged(fixture_bundles):
    from megaedge.runtime.transcriber import Transcriber

    return Transcriber.from_bundle(fixture_bundles["merged"])


def _final(tr, samples, rate, feed):
    stream = tr.create_stream(EXACT)
    for i in range(0, len(samples), feed):
        stream.accept_waveform(samples[i: i + feed], rate)
    return stream.final()


def _finals(tr, samples, options, feed):
    """Every final of a stream fed ``samples`` (16 kHz) in blocks of ``feed``, the last one's included."""
    from tests.runtime.test_streaming import _stream

    return [e for e in _stream(tr, samples, options, feed)[1] if e.kind == "final"]


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_finals_at_any_input_rate_equal_offline(merged, clips, rate):
    """Resampled by soxr in a stream, flushed at the end: the final equals offline transcription of the same
    samples at the same rate (its one-shot resampling), clip by clip."""
    from megaedge.runtime import audio as audio_io

    for path in clips:
        at_rate = audio_io.load(path, target=rate)
        offline = merged.transcribe(at_rate, rate=rate, segment_seconds=None)
        final = _final(merged, at_rate, rate, 4410)
        assert list(final.token_ids) == offline.token_ids, (path, rate)
        assert final.text == offline.text


@pytest.mark.parametrize("dtype", ["int16", "int32", "float64"])
def test_integer_pcm_is_scaled_as_offline(merged, clips, dtype):
    from megaedge.runtime import audio as audio_io

    samples = audio_io.load(clips[0])
    if dtype == "int16":
        pcm = np.clip(np.round(samples * 32768), -32768, 32767).astype(np.int16)
    elif dtype == "int32":
        pcm = np.clip(np.round(samples * 2.0**31), -2.0**31, 2.0**31 - 1).astype(np.int32)
    else:
        pcm = samples.astype(np.float64)
    offline = merged.transcribe(pcm, rate=16000, segment_seconds=None)
    assert offline.text and list(_final(merged, pcm, 16000, 3000).token_ids) == offline.token_ids


def test_a_rate_is_required_and_checked(merged):
    stream = merged.create_stream(EXACT)
    with pytest.raises(TypeError):
        stream.accept_waveform(np.zeros(100, np.float32))  # the rate is not optional
    for bad in (0, -16000, 10**9, 16000.5, True, "16000"):
        with pytest.raises(MegaedgeError, match="not a rate in whole Hz"):
            stream.accept_waveform(np.zeros(100, np.float32), bad)
    with pytest.raises(MegaedgeError, match="not a rate in whole Hz"):
        merged.transcribe(np.zeros(1600, np.float32), rate=0)
    with pytest.raises(MegaedgeError, match="not audio"):
        stream.accept_waveform(np.array(["a", "b"]), 16000)
    with pytest.raises(MegaedgeError, match="4 bytes are not samples; pass samples decoded from them"):
        stream.accept_waveform(b"RIFF", 16000)
    with pytest.raises(MegaedgeError, match="4 bytes are not samples; pass a file path"):
        merged.transcribe(b"RIFF")
    assert stream.accept_waveform(np.zeros(100, np.float32), 16000.0) == []  # sounddevice reports 48000.0


def test_same_tokens_same_text_offline_and_streaming(merged):
    """The model's output without the <asr_text> marker: one rule for both (runtime/text.py)."""
    from megaedge.runtime.text import parse_asr_output

    assert parse_asr_output("language English").text == ""
    assert parse_asr_output("language English", language_forced=True).text == "language English"
    assert parse_asr_output("open valve").text == "open valve"
    assert parse_asr_output("language English<asr_text>open valve").text == "open valve"
    tok = merged.tokenizer
    ids = tok.encode("language English", add_special_tokens=False).ids
    stream = merged.create_stream(EXACT)
    assert stream._text(ids) == merged.text_of(ids, False).text == ""


def test_route_a_bundle_cannot_take_is_refused(merged, fixture_bundles):
    from megaedge.runtime.transcriber import Transcriber

    for route in ("lora", "base"):
        with pytest.raises(MegaedgeError, match=f"route '{route}' needs a routed bundle"):
            merged.transcribe(np.zeros(16000, np.float32), route=route)
        with pytest.raises(MegaedgeError, match=f"route '{route}' needs a routed bundle"):
            merged.create_stream(StreamOptions(route=route))
        with pytest.raises(MegaedgeError, match=f"route '{route}' needs a routed bundle"):
            Transcriber.from_bundle(fixture_bundles["merged"], route=route)


def test_finals_carry_the_offline_confidence(merged, clips):
    offline = merged.transcribe(clips[1], segment_seconds=None)
    from megaedge.runtime import audio as audio_io

    final = _final(merged, audio_io.load(clips[1]), 16000, 5000)
    assert offline.mean_logprob is not None and offline.min_logprob <= offline.mean_logprob <= 0
    assert final.mean_logprob == pytest.approx(offline.mean_logprob, abs=1e-4)
    assert final.min_logprob == pytest.approx(offline.min_logprob, abs=1e-4)
    segment = offline.segments[0]
    assert len(segment.logprobs) == len(segment.token_ids) and segment.min_logprob == offline.min_logprob


def test_exact_preset_is_offline_segment_by_segment_on_long_audio(merged):
    """Past 30 s the exact preset cuts where offline transcription cuts, so its finals are transcribe()'s segments
    (a 60 s stream once ended in an empty final after partials had committed words)."""
    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import read_set

    items = read_set(fixture.heldout_manifest())
    chain = np.concatenate([audio_io.load(item["path"]) for item in items[:40]])
    chain = chain[: int(65 * 16000)]
    offline = merged.transcribe(chain)
    assert len(offline.segments) == 3
    finals = _finals(merged, chain, EXACT, 8000)
    assert [e.reason for e in finals] == ["segment", "segment", "flush"]
    assert [list(e.token_ids) for e in finals] == [s.token_ids for s in offline.segments]
    assert " ".join(e.text for e in finals if e.text) == offline.text and offline.text
    assert [round(e.start, 3) for e in finals] == [round(s.start, 3) for s in offline.segments]
    assert [round(e.end, 3) for e in finals] == [round(s.end, 3) for s in offline.segments]


def test_exact_segments_of_a_routed_bundle_name_their_route_and_keep_the_last_words(fixture_bundles):
    """Segment finals report the route offline transcription took for the segment (they named the route a hop
    guessed from the first second), and the words after the last cut are not lost to the speech gate (the VAD
    forgot at the cut what it had heard after it, and the flush came back empty)."""
    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime import vad
    from megaedge.runtime.evaluate import read_set
    from megaedge.runtime.transcriber import Transcriber

    if vad.installed_silero_model() is None:
        pytest.skip("silero-vad is not installed: the bundle has no speech gate to test")
    tr = Transcriber.from_bundle(fixture_bundles["routed"], vad="silero")  # the suite runs without a gate
    paths = sorted(item["path"] for item in read_set(fixture.heldout_manifest()))
    clean = [p for p in paths if "clean" in Path(p).name][:1]
    degraded = [p for p in paths if "noise" in Path(p).name or "distortion" in Path(p).name][:10]
    audio = np.concatenate([audio_io.load(clean[0]), np.zeros(800, np.float32)] + [audio_io.load(p) for p in degraded])
    finals = _finals(tr, audio, replace(EXACT, segment_seconds=12.0), 1600)
    offline = tr.transcribe(audio, segment_seconds=12.0)
    assert len(offline.segments) >= 3 and [e.reason for e in finals][-1] == "flush"
    assert [list(e.token_ids) for e in finals] == [s.token_ids for s in offline.segments]
    assert finals[-1].text and finals[-1].text == offline.segments[-1].text
    assert [(e.route, e.degraded_prob) for e in finals] == [(s.route, s.degraded_prob) for s in offline.segments]
    assert [(round(e.start, 3), round(e.end, 3)) for e in finals] == \
        [(round(s.start, 3), round(s.end, 3)) for s in offline.segments]


def test_finals_name_route_probability_and_language_and_the_stream_says_when_it_heard_speech(fixture_bundles):
    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import read_set
    from megaedge.runtime.transcriber import Transcriber

    routed = Transcriber.from_bundle(fixture_bundles["routed"], vad="auto")
    item = read_set(fixture.heldout_manifest())[0]
    samples = np.concatenate([np.zeros(8000, np.float32), audio_io.load(item["path"])])
    offline = routed.transcribe(samples, segment_seconds=None)
    stream = routed.create_stream(EXACT)
    heard = []
    for i in range(0, samples.size, 4000):
        stream.accept_waveform(samples[i: i + 4000], 16000)
        heard.append(stream.speech_heard)
    final = stream.final()
    assert heard[0] is False and heard[-1] is True
    assert final.degraded_prob == pytest.approx(offline.degraded_prob, abs=1e-6)
    assert final.language == offline.language and final.route == offline.route


def test_channels_first_and_channels_last_give_the_mono_transcript(merged, clips):
    """(channels, samples) as librosa and torchaudio give it, or (samples, channels) as soundfile does: the same
    mix, the same tokens, offline and streamed (a channels-first array once became two samples and no text)."""
    from megaedge.runtime import audio as audio_io

    mono = audio_io.load(clips[2])
    stereo = np.stack([mono * 0.5, mono * 1.5])  # channels first; averaging gives the mono samples back
    offline = merged.transcribe(mono, rate=16000, segment_seconds=None)
    assert offline.text
    for layout in (stereo, stereo.T.copy()):
        assert merged.transcribe(layout, rate=16000, segment_seconds=None).token_ids == offline.token_ids
    stream = merged.create_stream(EXACT)
    stream.accept_waveform(stereo[:, :4000], 16000)
    for i in range(4000, stereo.shape[1], 7):  # blocks too short to tell the layout keep the stream's
        stream.accept_waveform(stereo[:, i: i + 7], 16000)
    assert list(stream.final().token_ids) == offline.token_ids
    stream = merged.create_stream(EXACT)  # short channels-first blocks from the start: the shorter axis is channels
    for i in range(0, stereo.shape[1], 20):
        stream.accept_waveform(stereo[:, i: i + 20], 16000)
    assert list(stream.final().token_ids) == offline.token_ids


def test_channel_axis_rules():
    from megaedge.runtime.audio import channel_axis

    assert channel_axis((16000, 2)) == 1 and channel_axis((2, 16000)) == 0
    assert channel_axis((6, 33)) == 0 and channel_axis((33, 6)) == 1
    assert channel_axis((2, 7)) == 0 and channel_axis((7, 2)) == 1  # short: the shorter axis
    assert channel_axis((7, 2), known=0) == 0 and channel_axis((4, 4)) == 1  # a stream's layout wins; square
    assert channel_axis((16000, 64)) == 1 and channel_axis((64, 16000)) == 0  # a large array: the shorter axis


def test_a_block_of_seconds_is_cut_where_small_blocks_are(merged):
    """A stream's checks (endpoints, hops, cuts) ran once per call: a file fed in one block became one utterance,
    garbled (a new user's probe: `stream --hop 30` on 20 commands). Now one block and 0.1 s blocks give the same
    finals."""
    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import read_set

    items = [i for i in read_set(fixture.heldout_manifest()) if i["scenario"] == "clean"][:4]
    gap = np.zeros(int(1.5 * 16000), np.float32)
    audio = np.concatenate([part for i in items for part in (audio_io.load(i["path"]), gap)])

    def finals(block: int):
        return [(e.reason, list(e.token_ids)) for e in _finals(merged, audio, StreamOptions.preset("balanced"), block)
                if e.token_ids]

    small = finals(1600)
    assert len(small) == len(items)
    assert finals(audio.size) == small


def test_a_stream_fed_from_two_threads_at_once_says_so(merged, clips):
    """Two threads feeding one stream got a silently wrong final (fp32) or an obscure decoder error (int8)."""
    import threading

    from megaedge.runtime import audio as audio_io

    samples = audio_io.load(clips[0])
    stream = merged.create_stream(EXACT)
    inside, leave = threading.Event(), threading.Event()
    original = stream._accept

    def slow_accept(chunk, partials=True):
        inside.set()
        leave.wait(30)
        return original(chunk, partials)

    stream._accept = slow_accept
    first = threading.Thread(target=stream.accept_waveform, args=(samples[:1600], 16000))
    first.start()
    assert inside.wait(30)
    with pytest.raises(MegaedgeError, match=r"this stream is in accept_waveform\(\) on another thread"):
        stream.accept_waveform(samples[1600:3200], 16000)
    with pytest.raises(MegaedgeError, match=r"final\(\): this stream is in accept_waveform\(\) on another thread"):
        stream.final()
    leave.set()
    first.join(30)
    stream._accept = original
    stream.accept_waveform(samples[1600:], 16000)  # one caller again: fine
    assert stream.final().text == merged.transcribe(samples, segment_seconds=None).text
