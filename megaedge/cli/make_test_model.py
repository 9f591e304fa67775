"""``megaedge make-test-model``: write a random-weight checkpoint (tests, benchmarks, trying the toolchain)."""

from __future__ import annotations

import argparse

from megaedge.runtime import limits
from megaedge.runtime.limits import arg_type

NAME = "make-test-model"
HELP = "write a random-weight Qwen3-ASR/Mega-ASR checkpoint at tiny, 0.6b or 1.7b geometry"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output directory (must be empty or absent)")
    parser.add_argument("--geometry", choices=("tiny", "0.6b", "1.7b"), default="tiny")
    parser.add_argument("--layout", choices=("mega", "original", "native"), default="mega",
                        help="mega: Mega-ASR root with adapter and router (default); original: Qwen layout; native: -hf")
    parser.add_argument("--seed", type=arg_type(limits.check_int, parse=int, option="seed", low=limits.SEED[0],
                                                high=limits.SEED[1]),
                        default=0, help=f"random seed, {limits.SEED[0]}-{limits.SEED[1]} (default 0)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="weight dtype (default fp32 tiny, bf16 else)")
    parser.add_argument("--init", choices=("default", "realistic"), default="default",
                        help="realistic: unit-variance embeddings, norms 1, biases 0, so activations and logits spread "
                             "like a trained model's (what export validation must cope with); default: small "
                             "embeddings, logits within about +-5")


def run(args: argparse.Namespace) -> int:
    from megaedge.cli.common import need_export_extra

    need_export_extra()
    limits.check_output_dir(args.out, "OUT")
    from megaedge.export.factory import count_parameters, make_config, write_checkpoint

    path = write_checkpoint(args.out, geometry=args.geometry, layout_name=args.layout, seed=args.seed, dtype=args.dtype,
                            init=args.init)
    counts = count_parameters(make_config(args.geometry))
    print(f"wrote {args.geometry} ({counts['total'] / 1e9:.3f}B parameters, {args.layout} layout) to {path}")
    return 0
