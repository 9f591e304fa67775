"""``megaedge reference``: transcribe with the torch reference (transformers' own model, processor and generate)."""

from __future__ import annotations

import argparse

from megaedge.cli.common import add_decoding_options

NAME = "reference"
HELP = "transcribe files with the torch reference model (the oracle every backend is tested against)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint directory (any supported layout)")
    parser.add_argument("files", nargs="+", help="audio files (any format soundfile reads, any rate)")
    parser.add_argument("--adapter", help="LoRA adapter directory")
    parser.add_argument("--router", help="router safetensors file")
    parser.add_argument("--route", choices=("auto", "lora", "merged", "base"), default="auto",
                        help="auto: the router decides per file (default); lora (or merged): LoRA on, as "
                             "transcribe's --route lora; base: LoRA off")
    add_decoding_options(parser, text_tokens=False)


def run(args: argparse.Namespace) -> int:
    from megaedge.cli.common import need_export_extra, print_json_line

    need_export_extra()
    from megaedge.export.loader import load_checkpoint
    from megaedge.export.reference import transcribe
    from megaedge.runtime import audio as audio_io

    samples = [audio_io.load(f) for f in args.files]  # fail on a bad file before loading the model
    loaded = load_checkpoint(args.model, adapter=args.adapter, router=args.router, lora="branches")
    route = "merged" if args.route == "lora" else args.route
    if route == "merged" and loaded.adapter is None:
        from megaedge.errors import MegaedgeError

        raise MegaedgeError(f"--route {args.route}: {args.model} has no LoRA adapter to turn on; pass --adapter DIR "
                            "or leave --route at auto")
    if route != "base" and loaded.adapter is None:
        route = "base"
    for name, audio in zip(args.files, samples):
        res = transcribe(loaded, audio, route=route, language=args.language, context=args.context,
                         max_new_tokens=args.max_new_tokens)
        if args.json:
            print_json_line({"file": name, "text": res.text, "language": res.language, "route": res.route,
                        "degraded_prob": res.degraded_prob, "token_ids": res.token_ids, "seconds": round(res.seconds, 3)})
        else:
            prob = f" p_degraded={res.degraded_prob:.2f}" if res.degraded_prob is not None else ""
            print(f"{name}\t[{res.language or '?'}; {res.route}{prob}]\t{res.text}")
    return 0
