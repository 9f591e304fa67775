"""Helpers shared by CLI commands (argument types, JSON output)."""

from __future__ import annotations

import json
import sys

from megaedge.errors import require
from megaedge.runtime import limits
from megaedge.runtime.limits import arg_type

EXPORT_MODULES = ("torch", "transformers", "safetensors", "onnx", "onnxscript", "jiwer")


def need_export_extra() -> None:
    """Fail with the pip command that fixes it when a module of the export extra is missing, before any work (an
    INT8 export found jiwer missing at its report, after the quantization)."""
    import importlib.util

    for module in EXPORT_MODULES:
        if importlib.util.find_spec(module) is None:
            require(module, "export")


def add_decoding_options(parser, text_tokens: bool = True) -> None:
    """Options every transcribing command shares (torch reference and lean runtime alike). ``text_tokens``: the
    budget counts the text after the language prefix (the runtime); else every generated token (transformers'
    max_new_tokens, the reference)."""
    add_language_option(parser)
    add_context_option(parser)
    counted = "text tokens after the 'language X' prefix" if text_tokens else "tokens generated"
    parser.add_argument("--max-new-tokens", type=arg_type(limits.check_max_new_tokens, parse=int),
                        help=f"most {counted} per segment, 1-{limits.MAX_NEW_TOKENS} (default: sized from the "
                             "audio length)")
    parser.add_argument("--json", action="store_true", help="one JSON object per file, one per line (JSON Lines)")


def add_language_option(parser) -> None:
    parser.add_argument("--language", type=arg_type(limits.check_language),
                        help="force the output language: a name or ISO code Qwen3-ASR knows, any case (English, en, "
                             "Chinese, zh, ...; default: detected)")


def add_context_option(parser) -> None:
    parser.add_argument("--context", type=arg_type(limits.check_context),
                        help=f"context / hotwords placed in the system prompt: plain text, at most "
                             f"{limits.MAX_CONTEXT_CHARS} characters and {limits.MAX_CONTEXT_TOKENS} tokens, no "
                             "control tokens")


def add_threads_option(parser, what: str = "default: all cores") -> None:
    parser.add_argument("--threads", type=arg_type(limits.check_threads, parse=int),
                        help=f"onnxruntime intra-op threads, 1 to {limits.THREADS_PER_CORE} x the usable cores "
                             f"({what})")


def add_engine_size_options(parser) -> None:
    """Sizes TensorRT engines are built for (build-engines) or planned with (plan)."""
    low, high = limits.ENGINE_AUDIO_SECONDS
    audio = arg_type(limits.check_seconds, parse=float, option="max-audio-seconds", low=low, high=high,
                     low_inclusive=True, fix="long files run in 30 s segments, so 30 covers any length")
    parser.add_argument("--max-audio-seconds", type=audio, default=30.0, help=f"longest audio per call, {low:g}-{high:g} s (default 30)")
    parser.add_argument("--max-new-tokens", type=arg_type(limits.check_max_new_tokens, parse=int), default=256,
                        help=f"most tokens generated per segment, 1-{limits.MAX_NEW_TOKENS} (default 256)")
    low, high = limits.WORKSPACE_MIB
    parser.add_argument("--workspace", type=arg_type(limits.check_int, parse=int, option="workspace", low=low,
                                                     high=high),
                        default=1024, help=f"TensorRT builder workspace in MiB, {low}-{high} (default 1024)")


def add_decode_engine_option(parser) -> None:
    """--decode: which engine runs the decode steps of the lean runtime (runtime.options.ENGINES)."""
    from megaedge.runtime.options import ENGINES, KV_CACHES

    parser.add_argument("--decode", choices=ENGINES, default="auto",
                        help="decode steps of a weight-only INT8 bundle: native (megaedge's CPU kernel for this "
                             "CPU's instruction set, shipped with the package), ort (onnxruntime), auto (native "
                             "where possible; default)")
    parser.add_argument("--prefill", choices=("auto", "native", "ort"), default="auto",
                        help="the prompt, when the decode steps run natively: native (the same kernel, several rows "
                             "per weight load), ort (the bundle's onnxruntime graph), auto (the bundle's prefill "
                             "graph where it has one, else native; default). A stream that decodes natively "
                             "prefills natively too")
    parser.add_argument("--stem", choices=("auto", "native", "ort"), default="auto",
                        help="the encoder's convolution stem of an INT8 CPU bundle: native (megaedge's int8 kernel, "
                             "then the bundle's encoder body graph), ort (the whole encoder graph in onnxruntime), "
                             "auto (native where the CPU has int8 dot products; default)")
    parser.add_argument("--kv-cache", choices=KV_CACHES, default="float32",
                        help="keys and values the native decoder keeps: float32 (default, as the graphs) or float16 "
                             "(half the memory per position and half what attention reads per step; the logits "
                             "move by the rounding)")


def add_digest_option(parser) -> None:
    parser.add_argument("--expect-digest", metavar="SHA256",
                        help="refuse the bundle unless its manifest digest is this one (megaedge doctor --bundle "
                             "prints it): pins the exact bundle a deployment was tested with")


def add_vad_option(parser) -> None:
    parser.add_argument("--vad", choices=("auto", "silero", "energy", "off"), default=None,
                        help="voice-activity gate: audio in which it hears no speech gives no text (offline "
                             "segments, stream partials and finals). silero (the bundle's Silero model, or an "
                             "installed silero-vad), energy (frame energy: tones, hum and machinery can pass), off "
                             "(only digital silence is gated), auto (silero where a model is found, else energy; "
                             "default, or $MEGAEDGE_VAD)")


def print_json_line(obj) -> None:
    """One object on one line (JSON Lines: several files' results stay parseable line by line)."""
    print(json.dumps(obj, ensure_ascii=False), flush=True)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
