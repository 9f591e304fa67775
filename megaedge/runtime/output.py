"""What results look like to other programs: per-token confidence in OpenAI's ``logprobs`` shape, and subtitles
(SubRip, WebVTT) from a result's segments. Shared by ``megaedge transcribe`` and the server."""

from __future__ import annotations

import functools
import math


@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE spells each byte as one character: printable Latin-1 bytes as themselves, the others as the
    characters from U+0100 on, in byte order. Inverting that gives a token's exact bytes, even when they are only
    part of a UTF-8 character (decoding such a token alone gives U+FFFD)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(0x100 + shifted)] = byte
            shifted += 1
    return table


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes token ``token`` adds to the text (its UTF-8 when the vocabulary is not byte-level)."""
    piece = tokenizer.id_to_token(token)
    if piece is None:
        return b""
    table = _byte_of_char()
    if all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")


def text_token_logprobs(tokenizer, tokens, logprobs, marker: int | None, text: str | None = None) -> list[dict]:
    """``[{"token", "logprob", "bytes"}]`` for the text tokens of a decode: those after the ``<asr_text>`` marker
    (``marker``; None when the prompt forced the language, so that every token is text). The language prefix is
    left out: it is not part of the transcript.

    ``text``, when given, is the transcript these tokens became: where it lost leading words the tokens hold (a
    stream's final drops the words its previous utterance already ended with), the tokens of those words are left
    out too, so that the tokens spell the transcript (up to spaces at the ends)."""
    tokens, logprobs = list(tokens), list(logprobs)
    if marker is not None:
        at = next((i for i, t in enumerate(tokens) if t == marker), None)
        if at is None:  # no text was reached (a bare "language X"), or a model that skipped the marker
            return [] if text is not None and not text else _entries(tokenizer, tokens, logprobs)
        tokens, logprobs = tokens[at + 1 :], logprobs[at + 1 :]
    entries = _entries(tokenizer, tokens, logprobs)
    if text:
        joined = lambda items: b"".join(bytes(e["bytes"]) for e in items).decode("utf-8", "replace").strip()  # noqa: E731
        whole = joined(entries)
        if whole != text and whole.endswith(text):
            while len(entries) > 1 and joined(entries[1:]).endswith(text):
                entries = entries[1:]
    return entries


def token_logprobs(transcriber, item) -> list[dict]:
    """OpenAI's ``logprobs`` entries of a transcript: a ``SegmentResult`` (``Result.segments``) or a final
    ``StreamEvent``. A forced language's prompt already ends in the marker, so its tokens hold none and are all text,
    as ``parse_asr_output`` reads them."""
    return text_token_logprobs(transcriber.tokenizer, item.token_ids, item.logprobs,
                               transcriber.manifest.prompt.asr_text, item.text)


def _entries(tokenizer, tokens, logprobs) -> list[dict]:
    out = []
    for token, logprob in zip(tokens, logprobs):
        raw = token_bytes(tokenizer, token)
        out.append({"token": raw.decode("utf-8", "replace"), "logprob": float(logprob), "bytes": list(raw)})
    return out


# ------------------------------------------------------------------------------------------------ subtitles
SUBTITLE_FORMATS = ("srt", "vtt")


def _clock(seconds: float, decimal: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def subtitles(segments, fmt: str) -> str:
    """The segments that hold text as SubRip (``srt``) or WebVTT (``vtt``) cues, numbered from 1. A cue's text is
    one line: a blank line inside it would end the cue, and ``-->`` would read as a timing line."""
    if fmt not in SUBTITLE_FORMATS:
        raise ValueError(f"subtitle format {fmt!r} is not one of {SUBTITLE_FORMATS}")
    decimal = "," if fmt == "srt" else "."
    cues = []
    for segment in segments:
        text = " ".join((segment.text or "").split()).replace("-->", "->")
        if not text or not (math.isfinite(segment.start) and math.isfinite(segment.end)):
            continue
        cues.append(f"{len(cues) + 1}\n{_clock(segment.start, decimal)} --> {_clock(segment.end, decimal)}\n{text}\n")
    body = "\n".join(cues)
    return ("WEBVTT\n\n" + body) if fmt == "vtt" else body
