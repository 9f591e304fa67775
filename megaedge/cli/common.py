"""Helpers shared by CLI commands (argument types, JSON output)."""

from __future__ import annotations

import json
import sys

from megaedge.errors import require


def need_export_extra() -> None:
    """Fail with the pip command that fixes it when torch/transformers are missing."""
    for module in ("torch", "transformers", "safetensors"):
        require(module, "export")


def add_decoding_options(parser) -> None:
    """Options every transcribing command shares (torch reference and lean runtime alike)."""
    parser.add_argument("--language", help="force the output language (e.g. English)")
    parser.add_argument("--context", help="context / hotwords placed in the system prompt")
    parser.add_argument("--max-new-tokens", type=int, help="token budget (default: sized from the audio length)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")


def add_decode_engine_option(parser) -> None:
    """--decode: which engine runs the decode steps of the lean runtime (runtime.transcriber.DECODE_ENGINES)."""
    parser.add_argument("--decode", choices=("auto", "native", "ort"), default="auto",
                        help="decode steps of a weight-only INT8 bundle: native (megaedge's CPU kernel, built on "
                             "first use with the machine's C compiler), ort (onnxruntime), auto (native where "
                             "possible; default)")
    parser.add_argument("--prefill", choices=("auto", "native", "ort"), default="auto",
                        help="the prompt, when the decode steps run natively: native (the same kernel, several rows "
                             "per weight load), ort (the bundle's onnxruntime graph), auto (the bundle's prefill "
                             "graph where it has one, else native; default). A stream that decodes natively "
                             "prefills natively too")
    parser.add_argument("--stem", choices=("auto", "native", "ort"), default="auto",
                        help="the encoder's convolution stem of an INT8 CPU bundle: native (megaedge's int8 kernel, "
                             "then the bundle's encoder body graph), ort (the whole encoder graph in onnxruntime), "
                             "auto (native where the CPU has int8 dot products; default)")


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
