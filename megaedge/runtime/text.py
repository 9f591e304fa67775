"""Text-side rules shared by the torch reference and the runtime: output parsing and generation budgets."""

from __future__ import annotations

import math
from dataclasses import dataclass

ASR_TEXT_MARKER = "<asr_text>"
# Qwen3-ASR emits ~2.6-3.8 tokens per second of speech (field-lessons.md); fast speech and CJK run higher. The
# budget leaves 2.5x headroom over the fast end instead of upstream's fixed 256, which truncates long speech.
TOKENS_PER_SECOND_BUDGET = 10.0
MIN_NEW_TOKENS = 32


def max_new_tokens_for(seconds: float) -> int:
    return max(MIN_NEW_TOKENS, math.ceil(seconds * TOKENS_PER_SECOND_BUDGET) + 16)


@dataclass(frozen=True)
class ParsedOutput:
    language: str | None
    text: str


def parse_asr_output(decoded: str, language_forced: bool = False) -> ParsedOutput:
    """``language English<asr_text>text`` -> (English, text); ``language None<asr_text>`` -> (None, '').

    A forced-language prompt already contains the prefix, so the generated text has no marker: all of it is text.
    Otherwise output without the marker never reached its text: a bare ``language X`` (cut by a budget or ended
    by EOS) is no text at all, and anything else is taken as text. Offline results and stream events both go
    through here, so the same tokens always give the same text.
    """
    raw = (decoded or "").strip()
    if ASR_TEXT_MARKER not in raw:
        if language_forced or not (raw == "language" or raw.startswith("language ")):
            return ParsedOutput(None, raw)
        return ParsedOutput(None, "")
    prefix, text = raw.split(ASR_TEXT_MARKER, 1)
    first = next((line.strip() for line in prefix.splitlines() if line.strip()), "")
    language = first[len("language ") :].strip() if first.lower().startswith("language ") else (first or None)
    if language is not None and language.lower() == "none":
        language = None
    return ParsedOutput(language or None, text.strip())
