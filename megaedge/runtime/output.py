"""What results look like to other programs: per-token confidence in OpenAI's ``logprobs`` shape, and subtitles
(SubRip, WebVTT) from a result's segments. Shared by ``megaedge transcribe`` and the server."""

from __future__ import annotations

import functools
import math
import numbers
import re
import unicodedata

from megaedge.errors import MegaedgeError
from megaedge.runtime import limits


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


def _byte_level(tokenizer) -> bool:
    """Whether the vocabulary spells bytes (GPT-2 / Qwen byte-level BPE) rather than text pieces."""
    return type(getattr(tokenizer, "decoder", None)).__name__ == "ByteLevel"


def _pieces(tokenizer, tokens: list[int]) -> list[bytes]:
    """The bytes each token adds to the decoded text. Byte-level: through the byte table, exact even inside a
    character. Otherwise: the growth of the decoded text token by token (a piece's leading-space marker becomes
    the space it stands for)."""
    if _byte_level(tokenizer):
        table = _byte_of_char()
        out = []
        for token in tokens:
            piece = tokenizer.id_to_token(token) or ""
            if all(ch in table for ch in piece):
                out.append(bytes(table[ch] for ch in piece))
            else:  # an added token spelled as text
                out.append(tokenizer.decode([token], skip_special_tokens=False).encode("utf-8"))
        return out
    out, before = [], b""
    for k, token in enumerate(tokens):
        piece = tokenizer.id_to_token(token) or ""
        after = tokenizer.decode(tokens[: k + 1], skip_special_tokens=True).encode("utf-8")
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:  # SentencePiece's byte fallback: one byte of a character the vocabulary lacks
            out.append(bytes([int(byte.group(1), 16)]))
        elif after.startswith(before):
            out.append(after[len(before):])
        else:  # the text before it ended inside a character (decoded as U+FFFD): the piece itself
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
        before = after
    return out


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def text_token_logprobs(tokenizer, tokens, logprobs, marker: int | None, text: str | None = None) -> list[dict]:
    """``[{"token", "logprob", "bytes"}]`` for the text tokens of a decode: those after the ``<asr_text>`` marker
    (``marker``; None, or a decode without it, when the prompt forced the language, so that every token is text).
    The language prefix and special tokens are left out: they are not part of the transcript.

    ``text``, when given, is the transcript these tokens became, and the entries are those that spell it (up to
    spaces at its ends): where it lost leading words (a stream's final drops the words its previous utterance
    already ended with), the tokens of those words are left out; where a repetition was collapsed to one copy
    (``parse_asr_output``), the tokens of the copies that were dropped. An empty text has no tokens. Should the
    tokens fail to line up with the text (a collapse that cut inside a token), every text token is given."""
    tokens, logprobs = list(tokens), list(logprobs)
    if text is not None and not text.strip():
        return []
    if marker is not None and marker in tokens:
        at = tokens.index(marker)
        tokens, logprobs = tokens[at + 1 :], logprobs[at + 1 :]
    special = limits.added_token_ids(tokenizer, special_only=True)  # decoding skips them: never transcript
    kept = [(t, lp) for t, lp in zip(tokens, logprobs) if t not in special]
    pieces = _pieces(tokenizer, [t for t, _ in kept])
    entries = [{"token": raw.decode("utf-8", "replace"), "logprob": float(lp), "bytes": list(raw)}
               for raw, (_, lp) in zip(pieces, kept)]
    return entries if text is None else _spelling(entries, text)


def _spelling(entries: list[dict], text: str) -> list[dict]:
    def spelled(items) -> str:  # spaces compared as the words they separate: a final rejoins its words with one
        return " ".join(b"".join(bytes(e["bytes"]) for e in items).decode("utf-8", "replace").split())

    target, whole = " ".join(text.split()), spelled(entries)
    if whole == target:
        return entries
    if whole.endswith(target):  # leading words dropped: the last tokens that spell it exactly
        for start in range(len(entries) - 1, 0, -1):
            if spelled(entries[start:]) == target:
                return entries[start:]
    want = text.strip().encode("utf-8")  # copies dropped: in order, the tokens that continue the text
    kept, at = [], 0
    for entry in entries:
        raw = bytes(entry["bytes"])
        if at == 0:
            raw = raw.lstrip()
        if raw and want.startswith(raw, at):
            kept.append(entry)
            at += len(raw)
    return kept if at == len(want) else entries


def token_logprobs(transcriber, item) -> list[dict]:
    """OpenAI's ``logprobs`` entries of a transcript: a ``SegmentResult`` (``Result.segments``) or a final
    ``StreamEvent``. A forced language's prompt already ends in the marker, so its tokens hold none and are all text,
    as ``parse_asr_output`` reads them."""
    return text_token_logprobs(transcriber.tokenizer, item.token_ids, item.logprobs,
                               transcriber.manifest.prompt.asr_text, item.text)


# ------------------------------------------------------------------------------------------------ subtitles
SUBTITLE_FORMATS = ("srt", "vtt")
LINE_COLUMNS = 42  # the usual subtitle line; a CJK character takes two columns
CUE_LINES = 2  # a longer text is split into consecutive cues


def _clock(seconds: float, decimal: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def _wide(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")


def _width(text: str) -> int:
    """Columns on screen: CJK two, combining marks (Thai vowels and tones, accents) none, the rest one."""
    return sum(0 if unicodedata.category(ch) in ("Mn", "Me") else 2 if _wide(ch) else 1 for ch in text)


def _clusters(word: str) -> list[str]:
    """Characters with the combining marks that follow them: a line never starts with a mark."""
    out: list[str] = []
    for ch in word:
        if out and unicodedata.category(ch) in ("Mn", "Mc", "Me"):
            out[-1] += ch
        else:
            out.append(ch)
    return out


def _split_long(piece: str, columns: int) -> list[str]:
    """A word wider than a line (Thai, Lao, Khmer are written without spaces; a long code or address) in chunks
    of at most ``columns``, between characters: there is no dictionary here to find its word boundaries."""
    chunks, chunk = [], ""
    for cluster in _clusters(piece):
        if chunk and _width(chunk + cluster) > columns:
            chunks.append(chunk)
            chunk = ""
        chunk += cluster
    return [*chunks, chunk] if chunk else chunks


def _lines(text: str, columns: int = LINE_COLUMNS) -> list[str]:
    """``text`` in lines of at most ``columns``, broken at spaces, between CJK characters, which are written
    without spaces, and inside a word wider than a line (``_split_long``)."""
    pieces = []  # (piece, a space before it)
    for word in re.finditer(r"\S+", text):
        space = word.start() > 0
        for part in re.findall(r"[^\s]", word.group()) if any(map(_wide, word.group())) else [word.group()]:
            if pieces and not space and not _wide(part) and not _wide(pieces[-1][0][-1]):
                pieces[-1] = (pieces[-1][0] + part, pieces[-1][1])  # a run of narrow characters stays one word
            else:
                pieces.append((part, space))
            space = False
    pieces = [(chunk, space and k == 0) for piece, space in pieces
              for k, chunk in enumerate(_split_long(piece, columns) if _width(piece) > columns else [piece])]
    lines, line, used = [], "", 0
    for piece, space in pieces:
        width = _width(piece)
        gap = 1 if space and line else 0
        if line and used + gap + width > columns:
            lines.append(line)
            line, used = piece, width
        else:
            line, used = line + " " * gap + piece, used + gap + width
    return [*lines, line] if line else lines


def _escape(line: str, fmt: str) -> str:
    """No arrow may remain (``-->`` reads as a timing line); WebVTT reads ``&``, ``<`` and ``>`` as markup."""
    line = re.sub(r"-{2,}>", "->", line)
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") if fmt == "vtt" else line


def subtitles(segments, fmt: str) -> str:
    """The segments that hold text as SubRip (``srt``) or WebVTT (``vtt``) cues, numbered from 1: CUE_LINES lines
    of LINE_COLUMNS at most, so a segment with more text gives several cues, which share its time in proportion to
    their characters (the model gives no word times; offline segments run up to 30 s, cut at the quietest moment
    before the limit). No line is blank: a blank line would end the cue. Segments must be in time order with
    finite times, start <= end (as transcription gives them); anything else is refused in one line."""
    if fmt not in SUBTITLE_FORMATS:
        raise MegaedgeError(f"subtitle format {fmt!r} is not one of {SUBTITLE_FORMATS}")
    decimal = "," if fmt == "srt" else "."
    cues, last = [], 0.0
    for k, segment in enumerate(segments):
        start, end = segment.start, segment.end
        if not all(isinstance(t, numbers.Real) and math.isfinite(t) for t in (start, end)) or not (
                last <= start <= end):
            raise MegaedgeError(f"segment {k}: start {start!r} / end {end!r} are not finite seconds with "
                                f"{last:g} <= start <= end; pass segments as transcription gives them")
        last = start
        lines = _lines(" ".join((segment.text or "").split()))
        if not lines:
            continue
        groups = [lines[i : i + CUE_LINES] for i in range(0, len(lines), CUE_LINES)]
        total, done = sum(len(line) for line in lines), 0
        for group in groups:
            begin = start + (end - start) * done / total
            done += sum(len(line) for line in group)
            until = end if done == total else start + (end - start) * done / total
            text = "\n".join(_escape(line, fmt) for line in group)
            cues.append(f"{len(cues) + 1}\n{_clock(begin, decimal)} --> {_clock(until, decimal)}\n{text}\n")
    body = "\n".join(cues)
    return ("WEBVTT\n\n" + body) if fmt == "vtt" else body
