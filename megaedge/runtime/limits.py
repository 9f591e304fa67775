"""Ranges of every user-facing value, and the checks that enforce them.

One place for the limits so the command line (argparse ``type=`` callables from :func:`arg_type`) and the Python
API (Transcriber, streams, bench) refuse the same values with the same one-line message: the option, the value, the
range and a fix. Each range below says why it is where it is. Standard library only at import time: the CLI imports
this module to build its parser, and ``--help`` must work on a runtime-only install.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from pathlib import Path

from megaedge.errors import BundleError, MegaedgeError

# ------------------------------------------------------------------------------------------------------ ranges
# More intra-op threads than cores only oversubscribe: the threads of one operator wait on each other at every
# barrier (`--threads 1000` made no progress in 40 s on 2 cores; 100000 reached 9.7 GB RSS). A few per core are
# still allowed so scripts written for a bigger machine keep running; beyond that the value is a typo.
THREADS_PER_CORE = 4
# The decode budget of one segment. Segments are at most 30 s and Qwen3-ASR emits ~3-4 tokens per second of
# speech (text.TOKENS_PER_SECOND_BUDGET leaves 2.5x headroom: 316 tokens for 30 s), so 4096 is >10x the largest
# automatic budget; the KV cache is sized from it (1e9 tried to allocate 298 GiB), and 4096 keeps the whole
# sequence well inside Qwen3-ASR's 65536 decoder positions.
MAX_NEW_TOKENS = 4096
# Context (hotwords) goes into the system prompt of every segment and every streaming hop: its tokens are paid on
# each prefill (82,500 tokens took minutes per file). 2000 characters holds a few hundred hotwords.
MAX_CONTEXT_CHARS = 2000
MAX_CONTEXT_TOKENS = 1024
# The longest language name is 10 characters; the cap only keeps an error line short for absurd input.
MAX_LANGUAGE_CHARS = 64
# Stream hop: below 20 ms a hop is shorter than two feature frames; above 30 s it is longer than a segment.
# (Same range as runtime.streaming.StreamOptions, which checks it again for API users.)
HOP_SECONDS = (0.02, 30.0)
# Audio lengths a command generates or stops after. bench: 20 minutes is far past one 30 s segment, enough to
# measure long-form; stream --seconds: one day of audio.
BENCH_AUDIO_SECONDS = (0.0, 300.0)  # exclusive low end; one segment at most (segmenting.SEGMENT_RANGE)
STREAM_SECONDS = (0.0, 86400.0)  # exclusive low end
BENCH_REPEAT = (1, 1000)
BENCH_WARMUP = (0, 100)
EVAL_LIMIT = (1, 10_000_000)
CALIB_COUNT = (0, 100_000)  # clips per condition / scenario / clean copies
SEED = (0, 2**32 - 1)  # numpy's SeedSequence refuses negative seeds
# ONNX opsets: 17 is the first with LayerNormalization, which the exporter relies on. 21 is the newest onnxruntime
# has read since 1.18; a newer opset would not load where a device's wheel lags behind. Raise it once a newer
# opset has been run on the devices.
OPSET = (17, 21)
# TensorRT builder workspace in MiB: 64 is tensorrt.EngineOptions' floor; 1 TiB is beyond any board or GPU.
WORKSPACE_MIB = (64, 1 << 20)
ENGINE_AUDIO_SECONDS = (1.0, 1200.0)  # as tensorrt.EngineOptions checks it
PLAN_MEMORY_GIB = (0.0, 4096.0)  # exclusive low end; 4 TiB is beyond any device megaedge plans for

# The languages Qwen3-ASR is trained to be forced to: the names its prompt takes ("language <NAME><asr_text>"),
# keyed by ISO code as transformers' Qwen3-ASR processor accepts either. The 22 Chinese dialects it recognises are
# transcribed under "Chinese" / "Cantonese"; they have no name of their own in the prompt.
LANGUAGES = {
    "ar": "Arabic", "yue": "Cantonese", "zh": "Chinese", "cs": "Czech", "da": "Danish", "nl": "Dutch",
    "en": "English", "fil": "Filipino", "fi": "Finnish", "fr": "French", "de": "German", "el": "Greek",
    "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean",
    "mk": "Macedonian", "ms": "Malay", "fa": "Persian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "es": "Spanish", "sv": "Swedish", "th": "Thai", "tr": "Turkish", "vi": "Vietnamese",
}
_BY_LOWER = {**{code: name for code, name in LANGUAGES.items()}, **{n.lower(): n for n in LANGUAGES.values()}}
# Control-token spellings of Qwen's chat template (<|im_start|>, <|audio_pad|>, ...) and the ASR marker. Only a
# fallback for where no tokenizer is at hand (the command line, before a bundle is loaded): with a tokenizer,
# check_context refuses every added token it actually has, whatever its spelling.
_CONTROL_SPELLING = re.compile(r"<\|[^<>|\s]{1,64}\|>|</?asr_text>|</?think>|</?tool_call>|</?tool_response>")
# C0 and C1 control characters but tab, LF and CR: a NUL-filled context garbled a transcript in silence
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class LimitError(MegaedgeError):
    """A value outside its documented range. ``detail`` is the message without the option name (argparse adds
    ``argument --x:`` itself)."""

    def __init__(self, option: str, detail: str):
        super().__init__(f"{option} {detail}")
        self.option, self.detail = option, detail


def show(value, width: int = 40) -> str:
    """repr of a value, shortened: an error line about a 100 kB --context must stay one short line."""
    text = repr(value)
    return text if len(text) <= width else f"{text[: width - 12]}...' ({len(str(value))} chars)"


# ------------------------------------------------------------------------------------------------- numbers
def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: a container or taskset limit, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS / Windows have no affinity mask
        return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    return THREADS_PER_CORE * usable_cores()


def _int(value, option: str) -> int:
    # numbers.Integral: numpy integers count too; bool does not (True is not a thread count).
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise LimitError(option, f"{show(value)}: expected a whole number")


def _float(value, option: str) -> float:
    if isinstance(value, bool):
        raise LimitError(option, f"{show(value)}: expected a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LimitError(option, f"{show(value)}: expected a number") from None
    if not math.isfinite(number):
        raise LimitError(option, f"{show(value)}: must be a finite number")
    return number


def check_int(value, option: str, low: int, high: int, fix: str = "") -> int:
    number = _int(value, option)
    if not low <= number <= high:
        raise LimitError(option, f"{number} is outside {low}-{high}{'; ' + fix if fix else ''}")
    return number


def check_seconds(value, option: str, low: float, high: float, low_inclusive: bool = False, fix: str = "",
                  unit: str = "seconds") -> float:
    number = _float(value, option)
    ok = (low <= number if low_inclusive else low < number) and number <= high
    if not ok:
        span = f"{'[' if low_inclusive else '('}{low:g}, {high:g}] {unit}"
        raise LimitError(option, f"{number:g} is outside {span}{'; ' + fix if fix else ''}")
    return number


def check_threads(value, option: str = "threads") -> int:
    """1 .. 4 x usable cores (see THREADS_PER_CORE)."""
    cores = usable_cores()
    return check_int(value, option, 1, THREADS_PER_CORE * cores,
                     f"this process may use {cores} core{'s' if cores != 1 else ''} and more threads than cores "
                     f"only oversubscribe them; pass {cores} (or leave it out for all cores)")


def check_max_new_tokens(value, option: str = "max_new_tokens") -> int:
    """1 .. MAX_NEW_TOKENS per segment (0 or less would return an empty transcript)."""
    return check_int(value, option, 1, MAX_NEW_TOKENS,
                     "it is a per-segment budget (segments are <= 30 s, ~4 tokens/s); leave it out to size it from "
                     "the audio")


def check_hop(value, option: str = "hop") -> float:
    return check_seconds(value, option, *HOP_SECONDS, low_inclusive=True, fix="e.g. 0.64")


def check_audio_seconds(value, option: str = "audio") -> float:
    return check_seconds(value, option, *BENCH_AUDIO_SECONDS, fix="e.g. 10,30")


def check_stream_seconds(value, option: str = "seconds") -> float:
    return check_seconds(value, option, *STREAM_SECONDS, fix="leave it out to run until Ctrl-C / end of file")


# --------------------------------------------------------------------------------------------- language, context
def check_language(value, option: str = "language") -> str | None:
    """A language Qwen3-ASR can be forced to, by name or ISO code, any case -> its canonical name ("english" ->
    "English", "zh" -> "Chinese"). None (or empty) -> None: the model detects the language itself."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise LimitError(option, f"{show(value)}: expected a language name such as English")
    key = value.strip()
    if not key:
        return None
    found = _BY_LOWER.get(key.lower()) if len(key) <= MAX_LANGUAGE_CHARS else None
    if found is None:
        raise LimitError(option, f"{show(value)} is not a language Qwen3-ASR knows; use one of "
                                 f"{', '.join(sorted(LANGUAGES.values()))} (or an ISO code such as en), or leave it "
                                 "out to detect the language")
    return found


def added_token_ids(tokenizer, special_only: bool = False) -> set[int]:
    """Ids of the tokenizer's added tokens (<|im_start|>, <|audio_pad|>, <asr_text>, ...): the prompt's control
    tokens, never text a user may place in it. ``special_only``: those marked special, which decoding skips
    (<asr_text> is not: decoded text keeps it)."""
    getter = getattr(tokenizer, "get_added_tokens_decoder", None)
    added = getter() if getter is not None else getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {i for i, token in added.items() if not special_only or getattr(token, "special", False)}


def check_context(text, tokenizer=None, prompt=None, option: str = "context") -> str | None:
    """Context / hotwords for the system prompt: at most MAX_CONTEXT_CHARS characters and MAX_CONTEXT_TOKENS
    tokens, and no control token (it would be injected into the prompt as one). ``tokenizer`` (a ``tokenizers``
    Tokenizer) makes the token checks exact; ``prompt`` (manifest.PromptIds) adds the ids the bundle's prompt uses,
    for tokenizers whose control tokens are not registered as added tokens. Returns the text, or None when empty."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise LimitError(option, f"{show(text)}: expected text")
    if not text.strip():
        return None
    if len(text) > MAX_CONTEXT_CHARS:
        raise LimitError(option, f"of {len(text)} characters is longer than {MAX_CONTEXT_CHARS}; it is placed in "
                                 "the prompt of every segment, keep it to the hotwords that matter")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LimitError(option, f"has an unpaired surrogate at character {exc.start}, which is not text (bytes "
                                 "read with errors='surrogateescape'?); decode them as UTF-8") from None
    control = _CONTROL_CHARACTER.search(text)
    if control:
        raise LimitError(option, f"contains the control character U+{ord(control.group(0)):04X} at character "
                                 f"{control.start()}; context is plain text (tab, LF and CR are fine)")
    spelled = _CONTROL_SPELLING.search(text)
    if spelled:
        raise LimitError(option, f"contains the control token {spelled.group(0)!r}; remove it (context is plain "
                                 "text, it cannot change the prompt)")
    if tokenizer is None:
        return text
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) > MAX_CONTEXT_TOKENS:
        raise LimitError(option, f"is {len(ids)} tokens, more than {MAX_CONTEXT_TOKENS}; shorten it")
    refused = added_token_ids(tokenizer)
    if prompt is not None:
        refused |= {prompt.audio_pad, prompt.asr_text, *prompt.eos}
    bad = next((i for i in ids if i in refused), None)
    if bad is not None:
        raise LimitError(option, f"contains the control token {tokenizer.id_to_token(bad)!r} (id {bad}); remove it "
                                 "(context is plain text, it cannot change the prompt)")
    return text


def check_decoding(language=None, context=None, max_new_tokens=None, tokenizer=None, prompt=None) -> tuple:
    """The three decoding options of transcribe() / streams at once -> (language, context, max_new_tokens), each
    normalised (None stays None: language detected, no context, budget from the audio)."""
    return (check_language(language), check_context(context, tokenizer, prompt),
            None if max_new_tokens is None else check_max_new_tokens(max_new_tokens))


# ------------------------------------------------------------------------------------------------- files
def check_output_file(path, option: str) -> Path:
    """A file the command writes at the end (--json OUT, --plot PNG): checked before the run, not after it."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise LimitError(option, f"{target} is a directory; give a file path such as {target / 'report.json'}")
    parent = target.parent
    if not parent.is_dir():
        raise LimitError(option, f"{target}: folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise LimitError(option, f"{target}: cannot write there (read-only); pick a writable folder")
    return target


def check_output_dir(path, option: str) -> Path:
    """A folder the command creates or fills: it (or, when it does not exist yet, its nearest existing parent) must
    be a writable directory."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise LimitError(option, f"{target} is a file, not a folder; give a folder path")
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise LimitError(option, f"{target}: {probe} is a file, so the folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LimitError(option, f"{target}: cannot write in {probe} (read-only); pick a writable folder")
    return target


def check_list_input(path, option: str, suffixes=(".jsonl",), folder_ok: bool = False) -> Path:
    """A clip list (JSONL) or, where ``folder_ok``, a folder: an audio file here is refused with one line (reading a
    .wav as JSON fails deep in the parser)."""
    target = Path(path).expanduser()
    what = f"a {'folder or ' if folder_ok else ''}{'/'.join(suffixes)} list"
    if target.is_dir():
        if folder_ok:
            return target
        raise LimitError(option, f"{target} is a folder; expected {what}")
    if not target.exists():
        raise LimitError(option, f"{target}: no such file or folder; expected {what}")
    if target.suffix.lower() not in suffixes:
        raise LimitError(option, f"{target} is not {what} (one JSON object with path and text per line); "
                                 f"{'pass its folder or ' if folder_ok else ''}write a list")
    return target


def load_tokenizer(path):
    """``tokenizers.Tokenizer.from_file`` whose failure is one line naming the file and the fix (the library raises a
    bare Exception with a serde message for a malformed or truncated file)."""
    from tokenizers import Tokenizer

    file = Path(path)
    if not file.is_file():
        raise BundleError(f"{file}: no tokenizer file; copy the whole bundle (or re-export it)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises plain Exception for every parse error
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise BundleError(f"{file}: not a valid tokenizer.json ({reason}); the file is damaged or truncated: copy "
                          "the bundle again or re-export it") from exc


# ------------------------------------------------------------------------------------------------- argparse
def arg_type(check, *, parse=None, **kwargs):
    """An argparse ``type=`` callable: ``parse`` (int / float / str) the text, then ``check`` it; a LimitError
    becomes argparse's own error (``argument --x: <detail>``), which the CLI prints as one line."""
    import argparse

    def convert(text):
        try:
            value = parse(text) if parse is not None else text
        except ValueError:
            wanted = {int: "whole number", float: "number"}.get(parse, "value")
            raise argparse.ArgumentTypeError(f"{show(text)}: expected a {wanted}") from None
        try:
            return check(value, **kwargs)
        except LimitError as exc:
            raise argparse.ArgumentTypeError(exc.detail) from None

    convert.__name__ = getattr(check, "__name__", "value")
    return convert
