"""What POST /v1/audio/transcriptions answers besides text, through the official openai client: per-token
confidence (include[]=logprobs) and subtitles (response_format srt / vtt)."""

from __future__ import annotations

import pytest

from tests.serve.conftest import text_part, two_clip_file

openai = pytest.importorskip("openai", reason="needs the openai client (dev extra)")


def client(running):
    return openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_include_logprobs_gives_each_text_token_and_its_logprob(server, serve_transcriber, clips):
    """A command interface reads which word the model was unsure of: the text tokens' log-probabilities, spelled so
    that their bytes are the transcript, for the request as it was sent (detected or forced language)."""
    api = client(server)
    for item, language in ((clips[0], None), (clips[1], "en")):
        expected = serve_transcriber.transcribe(item["path"], language=language and "English")
        extra = {"language": language} if language else {}
        with open(item["path"], "rb") as f:
            out = api.audio.transcriptions.create(model="m", file=f, include=["logprobs"], **extra)
        assert out.text == expected.text and out.text
        _, logprobs = text_part(serve_transcriber, expected.segments[0], language is not None)
        got = [entry.model_dump() for entry in out.logprobs]
        assert [e["logprob"] for e in got] == logprobs  # the prefix's tokens ("language English<asr_text>") left out
        spelled = bytes(int(b) for e in got for b in e["bytes"])  # the client types bytes as floats
        assert spelled.decode().strip() == out.text
        assert min(e["logprob"] for e in got) >= expected.min_logprob
        with open(item["path"], "rb") as f:
            plain = api.audio.transcriptions.create(model="m", file=f, **extra)
        assert plain.logprobs is None  # only when asked
        with open(item["path"], "rb") as f:
            verbose = api.audio.transcriptions.create(model="m", file=f, include=["logprobs"],
                                                      response_format="verbose_json", **extra).model_dump()
        assert verbose["logprobs"] == got and verbose["segments"][0]["text"] == expected.segments[0].text


def test_streamed_deltas_carry_their_segments_logprobs(server, serve_transcriber, clips, tmp_path):
    path = two_clip_file(clips[2]["path"], clips[3]["path"], 26, tmp_path / "two.wav")  # two segments of text
    expected = serve_transcriber.transcribe(str(path))
    texts = [s for s in expected.segments if s.text]
    assert len(texts) == 2
    with open(path, "rb") as f:
        events = list(client(server).audio.transcriptions.create(model="m", file=f, stream=True,
                                                                  include=["logprobs"]))
    deltas, done = events[:-1], events[-1]
    assert [e.type for e in deltas] == ["transcript.text.delta"] * 2 and done.text == expected.text
    for delta, segment in zip(deltas, texts):
        # the tokens that spell the segment's text, in order (a collapsed repetition's dropped copies left out)
        _, logprobs = text_part(serve_transcriber, segment, False)
        got = iter(logprobs)
        assert all(any(e.logprob == lp for lp in got) for e in delta.logprobs) and delta.logprobs
        assert bytes(int(b) for e in delta.logprobs for b in e.bytes).decode().strip() == segment.text
    assert [e.model_dump() for e in done.logprobs] == [e.model_dump() for d in deltas for e in d.logprobs]


def test_subtitles_cue_each_segment_with_text(server, serve_transcriber, clips, tmp_path):
    path = two_clip_file(clips[0]["path"], clips[1]["path"], 27, tmp_path / "two.wav")
    expected = serve_transcriber.transcribe(str(path))
    cued = [s for s in expected.segments if s.text]
    assert len(cued) == 2
    api = client(server)
    with open(path, "rb") as f:
        srt = api.audio.transcriptions.create(model="m", file=f, response_format="srt")
    with open(path, "rb") as f:
        vtt = api.audio.transcriptions.create(model="m", file=f, response_format="vtt")
    cues = [block.splitlines() for block in srt.strip().split("\n\n")]
    assert [cue[0] for cue in cues] == [str(i + 1) for i in range(len(cues))]
    assert " ".join(line for cue in cues for line in cue[2:]) == " ".join(" ".join(s.text.split()) for s in cued)
    starts = [cue[1].split(" --> ")[0] for cue in cues]
    assert starts[0] == _clock(cued[0].start, ",") and _clock(cued[1].start, ",") in starts
    assert cues[-1][1].split(" --> ")[1] == _clock(cued[1].end, ",")
    vtt_cues = [block.splitlines() for block in vtt.split("\n\n")[1:]]
    assert vtt.startswith("WEBVTT\n\n1\n") and len(vtt_cues) == len(cues)
    assert [c[1] for c in vtt_cues] == [c[1].replace(",", ".") for c in cues]


def _clock(seconds: float, mark: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{mark}{ms % 1000:03d}"


@pytest.mark.parametrize("extra, param", [
    ({"include": ["logprobs", "words"]}, "include[]"),
    ({"include": ["logprobs"], "response_format": "text"}, "include[]"),
    ({"include": ["logprobs"], "response_format": "srt"}, "include[]"),
    ({"stream": True, "response_format": "srt"}, "response_format"),
    ({"stream": True, "response_format": "vtt"}, "response_format"),
    ({"response_format": "tsv"}, "response_format"),
])
def test_what_cannot_be_answered_is_refused_in_one_line(server, clips, extra, param):
    with open(clips[0]["path"], "rb") as f, pytest.raises(openai.BadRequestError) as err:
        client(server).audio.transcriptions.create(model="m", file=f, **extra)
    body = err.value.body
    assert body["param"] == param and "\n" not in body["message"], body
