"""``megaedge merge``: fold the LoRA into the base weights exactly (fp32) and write a plain native checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "merge"
HELP = "merge a Mega-ASR LoRA into its base (exact fp32) and write a checkpoint transformers loads"
DESCRIPTION = (
    "Reads any supported layout (Mega-ASR root, original Qwen3-ASR, native -hf, or --adapter/--router beside a base), "
    "merges the adapter in fp32 and writes a native transformers checkpoint (safetensors) with tokenizer, processor "
    "and, when present, the router in audio_quality_router/."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint directory (any supported layout)")
    parser.add_argument("--out", required=True, help="output directory (must be empty or absent unless --force)")
    parser.add_argument("--adapter", help="LoRA adapter directory (default: the checkpoint's mega-asr-merged/)")
    parser.add_argument("--router", help="router safetensors (default: the checkpoint's audio_quality_router/)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the written weights; the merge itself is always fp32 (default float32)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output directory")


def _overlaps(source: Path, out: Path) -> bool:
    """Whether ``out`` is ``source``, inside it, or holds it."""
    a, b = source.expanduser().resolve(), out.expanduser().resolve()
    return a == b or a in b.parents or b in a.parents


def run(args: argparse.Namespace) -> int:
    from megaedge.cli.common import need_export_extra

    need_export_extra()
    import shutil

    from megaedge.errors import MegaedgeError
    from megaedge.export import layout
    from megaedge.export.loader import load_checkpoint, save_native
    from megaedge.runtime import limits

    out = limits.check_output_dir(args.out, "--out")
    for given, what in ((args.model, "the checkpoint"), (args.adapter, "the adapter"), (args.router, "the router")):
        if given is not None and _overlaps(Path(given), out):
            raise MegaedgeError(f"--out {out}: overlaps {what} {given}; merging there would overwrite the input; "
                                "choose a new folder")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise MegaedgeError(f"{out}: output directory is not empty; pass --force to write into it")
    loaded = load_checkpoint(args.model, adapter=args.adapter, router=args.router, lora="merge", load_router=False)
    if loaded.adapter is None:
        raise MegaedgeError(f"{args.model}: no adapter to merge; pass --adapter DIR")
    if loaded.source.router_file is not None:  # copied under a .safetensors name: it must be one
        from safetensors import safe_open

        try:
            with safe_open(str(loaded.source.router_file), "np"):
                pass
        except Exception as exc:  # safetensors raises its own SafetensorError for any bad header
            raise MegaedgeError(f"--router {loaded.source.router_file}: not a safetensors file ({exc}); pass the "
                                "router's .safetensors weights") from None
    save_native(loaded, out, dtype=args.dtype)
    if loaded.source.router_file is not None:
        (out / layout.ROUTER_DIR_NAME).mkdir(exist_ok=True)
        shutil.copyfile(loaded.source.router_file, out / layout.ROUTER_DIR_NAME / layout.ROUTER_FILE_NAME)
    print(f"merged {loaded.adapter.summary()} into {out}")
    return 0
