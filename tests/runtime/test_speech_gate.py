"""No text from non-speech, and no command dropped: the voice-activity gate end to end through the Transcriber.

Every clip of the non-speech corpus (calibration/nonspeech.py: digital silence, a silent 16-bit microphone, -60
dBFS noise, hum, DC, tones, square waves, machinery and vehicle noise, single samples, 0.05 s blips of speech)
gives no text offline and no event with text from a stream. Every held-out clip the FP32 fixture transcribes
today (fewer than half its words wrong) gives the same tokens with the gate on. The gate drops three held-out
clips, each of which FP32 gets half or more wrong (benchmarks/results/vad.json).
"""

from __future__ import annotations

import pytest

from megaedge.runtime import vad as vad_module
from megaedge.runtime.streaming import StreamOptions

pytestmark = pytest.mark.skipif(vad_module.installed_silero_model() is None,
                                reason="silero-vad not installed (pip install --no-deps silero-vad==6.2.3)")


@pytest.fixture(scope="module")
def gated(fixture_bundles):
    from megaedge.runtime.transcriber import Transcriber

    tr = Transcriber.from_bundle(fixture_bundles["merged"], vad="auto")
    assert isinstance(tr.vad, vad_module.SileroVad)
    return tr


@pytest.fixture(scope="module")
def ungated(fixture_bundles):
    from megaedge.runtime.transcriber import Transcriber

    return Transcriber.from_bundle(fixture_bundles["merged"], vad="off")


@pytest.fixture(scope="module")
def nonspeech():
    from megaedge.calibration.nonspeech import corpus

    return corpus(seed=0, durations=(0.5, 3.0))


def test_the_export_ships_the_silero_model(fixture_bundles):
    from megaedge.runtime import manifest

    info = manifest.read(fixture_bundles["merged"])
    assert info.graphs["vad"].file == manifest.VAD_FILE and manifest.VAD_FILE in info.files


def test_no_text_from_non_speech_offline(gated, ungated, nonspeech):
    spoken = []
    for clip in nonspeech:
        result = gated.transcribe(clip.samples, rate=16000)
        assert result.text == "" and result.token_ids == [], clip.name
        assert all(not s.speech for s in result.segments), clip.name
        if ungated.transcribe(clip.samples, rate=16000).text:
            spoken.append(clip.kind)
    # Without the gate, the decoder makes commands of these (what the gate is for): not only exact zeros
    assert {"lsb_noise", "tone", "machinery"} <= set(spoken)


@pytest.mark.parametrize("preset", ["balanced", "exact"])
def test_no_text_from_non_speech_streaming(gated, nonspeech, preset):
    for clip in nonspeech:
        stream = gated.create_stream(StreamOptions.preset(preset))
        events = []
        for i in range(0, max(clip.samples.size, 1), 3200):
            events += stream.accept_waveform(clip.samples[i: i + 3200], 16000)
        events.append(stream.final())
        assert all(not e.text and not e.token_ids for e in events), (clip.name, events)
        assert not any(e.kind == "partial" for e in events), clip.name


def test_no_command_fp32_transcribes_is_dropped(gated, ungated):
    """Per condition: clips FP32 transcribes (WER < 50 %) keep their exact tokens with the gate on."""
    import jiwer

    from megaedge import fixture
    from megaedge.runtime.evaluate import read_set

    kept, dropped = {}, []
    for item in read_set(fixture.heldout_manifest()):
        want = ungated.transcribe(item["path"])
        if not want.text or jiwer.wer(item["text"], want.text) >= 0.5:
            continue
        got = gated.transcribe(item["path"])
        condition = item.get("scenario", item["id"].rsplit("-", 1)[0])
        kept[condition] = kept.get(condition, 0) + (got.token_ids == want.token_ids)
        if got.token_ids != want.token_ids:
            dropped.append(item["id"])
    assert not dropped, dropped
    assert len(kept) >= 7  # every atomic condition has clips FP32 transcribes


def test_speech_is_still_streamed_with_the_gate(gated, ungated):
    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import read_set

    item = read_set(fixture.heldout_manifest())[0]
    samples = audio_io.load(item["path"])
    stream = gated.create_stream(StreamOptions.preset("exact"))
    events = []
    for i in range(0, samples.size, 4000):
        events += stream.accept_waveform(samples[i: i + 4000], 16000)
    final = stream.final()
    assert final.text and list(final.token_ids) == ungated.transcribe(samples, segment_seconds=None).token_ids
    assert any(e.kind == "partial" for e in events)


def test_vad_choice_is_checked(fixture_bundles, monkeypatch):
    from megaedge.errors import MegaedgeError
    from megaedge.runtime.transcriber import Transcriber

    with pytest.raises(MegaedgeError, match="vad 'loud' is not one of"):
        Transcriber.from_bundle(fixture_bundles["merged"], vad="loud")
    monkeypatch.setenv("MEGAEDGE_VAD", "energy")
    assert isinstance(Transcriber.from_bundle(fixture_bundles["merged"]).vad, vad_module.EnergyVad)
    monkeypatch.setenv("MEGAEDGE_VAD", "off")
    assert Transcriber.from_bundle(fixture_bundles["merged"]).vad is None
