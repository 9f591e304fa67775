"""Text-side rules shared by the torch reference and the runtime: output parsing and generation budgets."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

ASR_TEXT_MARKER = "<asr_text>"
# Qwen3-ASR emits ~2.6-3.8 tokens per second of speech (field-lessons.md); fast speech and CJK run higher. The
# budget leaves 2.5x headroom over the fast end instead of upstream's fixed 256, which truncates long speech.
TOKENS_PER_SECOND_BUDGET = 10.0
MIN_NEW_TOKENS = 32
# The official parser (and transformers' after it) collapses any character run, or any pattern of up to 20
# characters, repeated this many times or more to one copy: a degenerate decode then reads as a short text.
REPEAT_THRESHOLD = 20
REPEAT_WIDEST = 20


def max_new_tokens_for(seconds: float) -> int:
    return max(MIN_NEW_TOKENS, math.ceil(seconds * TOKENS_PER_SECOND_BUDGET) + 16)


@dataclass(frozen=True)
class ParsedOutput:
    language: str | None
    text: str


def parse_asr_output(decoded: str, language_forced: bool = False, collapse: bool = True) -> ParsedOutput:
    """``language English<asr_text>text`` -> (English, text); ``language None<asr_text>`` -> (None, '').

    A forced-language prompt already contains the prefix, so the generated text has no marker: all of it is text.
    Otherwise output without the marker never reached its text: a bare ``language X`` (cut by a budget or ended
    by EOS) is no text at all, and anything else is taken as text. Offline results and stream events both go
    through here, so the same tokens always give the same text. ``collapse=False`` skips the repetition rule: a
    stream's partials, whose committed text must only grow while a repeat count climbs towards the threshold.
    """
    raw = (decoded or "").strip()
    if "assistant\n" in raw:  # a decode that ran into a chat header: the reference parser keeps what follows it
        raw = raw.split("assistant\n", 1)[1]
    if collapse:
        raw = collapse_repeats(raw).strip()
    if ASR_TEXT_MARKER not in raw:
        if language_forced or not (raw == "language" or raw.startswith("language ")):
            return ParsedOutput(None, raw)
        return ParsedOutput(None, "")
    prefix, text = raw.split(ASR_TEXT_MARKER, 1)
    if prefix.strip().lower() == "language none":  # the model's word for no speech; only this spelling means it
        return ParsedOutput(None, text.strip())
    first = next((line.strip() for line in prefix.splitlines() if line.strip()), "")
    language = first[len("language ") :].strip() if first.lower().startswith("language ") else first
    return ParsedOutput(language or None, text.strip())


def collapse_repeats(text: str, times: int = REPEAT_THRESHOLD, widest: int = REPEAT_WIDEST) -> str:
    """The reference parser's repetition rule, so that our text equals the oracle's on a degenerate decode.

    First every run of one character longer than ``times`` becomes that character once. Then, scanning left to
    right, the first place where a pattern of 1..``widest`` characters (the shortest one) repeats ``times`` times
    or more keeps one copy and the scan goes on after the last repeat; the scan stops ``2 * times`` characters
    before the end, as the reference's does."""
    text = "".join(ch if len(run) > times else run
                   for ch, run in ((ch, "".join(g)) for ch, g in itertools.groupby(text)))
    end = len(text)
    if end < 2 * times:
        return text
    out = []
    i = 0
    while i <= end - 2 * times:
        for width in range(1, min(widest, (end - i) // times) + 1):
            stop = i + width * times
            unit = text[i : i + width]
            if text[i + width : i + 2 * width] == unit and text[i:stop] == unit * times:
                while text[stop : stop + width] == unit:
                    stop += width
                out.append(unit)
                i = stop
                break
        else:
            out.append(text[i])
            i += 1
    out.append(text[i:])
    return "".join(out)
