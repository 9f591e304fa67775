"""Batched native decode steps at a real geometry: aggregate tokens/s of 1, 2, 4, 8 concurrent sequences.

Builds the native decoder's weights directly (random int8 blocks in the MatMulNBits layout, the 1.7B or 0.6B
decoder geometry, the LM head tied to the embedding as exported bundles do), so no 1.7B export is needed: the
products, attention and per-layer work are the runtime's own (native_decode.step / step_batch). Each sequence
has a cache of ``--context`` positions (a 30 s prompt is ~400). Batch sizes (and the other contenders) are
interleaved step by step, so a busy spell of the machine hits every size alike; the median step of each size is
reported.

Per batch size: step seconds, aggregate tokens/s (batch / step), speed-up over one sequence, weight bytes read
per step and per token, the rate they are read at, and the share of the step a pure read of those bytes takes
at the one-sequence rate (the rest is products, attention and the small work between them).

With ``--lora-rank R`` every projection also gets a gated low-rank branch of rank R (a routed bundle's decoder)
and each batch size is timed on three routes in the same rounds: every sequence on the base route (the branches
skipped), every sequence on the LoRA route, and the two routes alternating in one batch (what streams of a routed
bundle share).

Usage: python benchmarks/batched_decode.py [--geometry 1.7b] [--batches 1,2,4,8] [--steps 12] [--rounds 3]
       [--baseline REV] (the kernels of git revision REV timed beside these, in the same rounds)
       [--block-sizes 128,32] (weights quantized in blocks of each size, timed in the same rounds: the first is
       the main one; a recipe's block size is what an INT8 study may trade for accuracy)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import provenance

from megaedge.runtime import kernels, machine, native_decode

RESULTS = Path(__file__).parent / "results"
GEOMETRIES = {
    "1.7b": dict(layers=28, hidden=2048, heads=16, kv_heads=8, head_dim=128, intermediate=6144, vocab=151936),
    "0.6b": dict(layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128, intermediate=3072, vocab=151936),
}
BLOCK = 128


_commit = provenance.commit

def write_weights(folder: Path, g: dict, seed: int = 0, block: int = BLOCK, lora_rank: int = 0
                  ) -> tuple[dict, int, int]:
    """weights.bin with every projection (uint8 blocks + float32 scales; with ``lora_rank`` a float32 branch A
    [k, rank], B [rank, n] too), norms and inv_freq; the native index of it, the bytes one decode step reads
    (projections, their scales and the LM head) and the branches' bytes (read on the LoRA route only)."""
    rng = np.random.default_rng(seed)
    path = folder / "weights.bin"
    offset, step_bytes, lora_bytes = 0, 0, 0

    with open(path, "wb") as f:
        def put(array: np.ndarray) -> dict:
            nonlocal offset
            data = np.ascontiguousarray(array)
            f.write(data.tobytes())
            ref = {"file": path.name, "offset": offset, "length": data.nbytes, "dtype": data.dtype.name,
                   "shape": list(data.shape)}
            offset += data.nbytes
            return ref

        def linear(k: int, n: int, rank: int = 0) -> dict:
            nonlocal step_bytes, lora_bytes
            blocks = k // block
            weight = rng.integers(0, 256, (n, blocks, block), dtype=np.uint8)
            # scales that keep activations near unit variance through the layer (1/sqrt(k) per product)
            scales = np.full((n, blocks), 1.0 / (64.0 * np.sqrt(k)), np.float32)
            step_bytes += weight.nbytes + scales.nbytes
            entry = {"k": k, "n": n, "block": block, "weight": put(weight), "scales": put(scales)}
            if rank:  # a branch whose output is a tenth of the product's (a LoRA's delta is small)
                a = (rng.standard_normal((k, rank)) / np.sqrt(k)).astype(np.float32)
                b = (0.1 * rng.standard_normal((rank, n)) / np.sqrt(rank)).astype(np.float32)
                lora_bytes += a.nbytes + b.nbytes
                entry["lora"] = {"rank": rank, "a": put(a), "b": put(b)}
            return entry

        h, q, kv, i = g["hidden"], g["heads"] * g["head_dim"], g["kv_heads"] * g["head_dim"], g["intermediate"]
        shapes = {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
        layers = []
        for _ in range(g["layers"]):
            entry = {name: linear(*shapes[name], lora_rank) for name in native_decode.PROJECTIONS}
            for name, size in (("input_norm", h), ("post_norm", h), ("q_norm", g["head_dim"]),
                               ("k_norm", g["head_dim"])):
                entry[name] = put(np.ones(size, np.float32))
            layers.append(entry)
        head = linear(h, g["vocab"])
        inv_freq = 1.0 / (1e6 ** (np.arange(0, g["head_dim"], 2, dtype=np.float32) / g["head_dim"]))
        index = {"format": "matmulnbits-q8", "zero_point": 128, **g, "eps": 1e-6, "scaling": g["head_dim"] ** -0.5,
                 "layers": layers, "lm_head": head,
                 "embedding": {"kind": "q8", "weight": head["weight"], "scales": head["scales"]},
                 "final_norm": put(np.ones(h, np.float32)), "inv_freq": put(inv_freq.astype(np.float32))}
    return index, step_bytes, lora_bytes


def baseline_kernels(rev: str, folder: Path, variant: str | None = None) -> kernels.Q8Kernels:
    """The kernel library as built from git revision ``rev``'s sources (same compiler and flags as this build: the
    ``variant``'s, e.g. avx2, else this CPU's), to time beside this checkout's in one run."""
    subprocess.run(f"git archive {rev} megaedge/assets/kernels | tar -x -C {folder}", shell=True, check=True,
                   cwd=Path(__file__).resolve().parents[1])
    cc, out = kernels.compiler(), folder / "baseline.so"
    source = folder / "megaedge" / "assets" / "kernels" / "decoder.c"
    flags = kernels.VARIANT_FLAGS[variant or "native"][0]
    subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(out), str(source), "-lm"], check=True)
    # ABI 7-9 read the same merged-model structs but for me_linear's layout field (10; kernels._structs): versions 8
    # and 9 only appended fields to me_model
    return kernels.Q8Kernels(out, origin=f"git {rev}", abis=(7, 8, 9, kernels.ABI_VERSION))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="1.7b")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=12, help="steps timed per batch size and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=400, help="cache positions per sequence before stepping")
    parser.add_argument("--short-context", type=int, default=8,
                        help="cache positions of the attention split's second run (0: no split)")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also time the kernels of git revision REV, interleaved with these")
    parser.add_argument("--block-sizes", default=str(BLOCK),
                        help="weights per scale, comma-separated: the first is the main build, the others are timed "
                             "beside it (e.g. 128,32)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="give every projection a gated branch of this rank (a routed decoder) and time the base "
                             "route, the LoRA route and both mixed in one batch")
    parser.add_argument("--half-cache", action="store_true",
                        help="also time decoders that keep their KV caches in float16 (kv_cache='float16'), "
                             "interleaved with these")
    parser.add_argument("--compare-small-pages", action="store_true",
                        help="also time decoders whose weights and caches are not advised as huge pages "
                             "(4 KiB pages, as before megaedge asked for them), interleaved with these")
    parser.add_argument("--kernels", choices=("avx2", "vnni", "portable"), default=None,
                        help="time this build of megaedge's kernels instead of this CPU's best (avx2: the path an "
                             "AVX2-only CPU runs, here on this CPU's cores and memory)")
    parser.add_argument("--compare-kernels", choices=("avx2", "vnni", "portable"), default=None,
                        help="also time this build of the kernels, interleaved with the main one")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON file (default results/batched_decode_<geometry>.json)")
    args = parser.parse_args()
    if args.baseline and args.lora_rank:
        sys.exit("--baseline with --lora-rank: an earlier revision's kernels may not know the branches")
    batches = [int(b) for b in args.batches.split(",")]
    blocks = [int(b) for b in args.block_sizes.split(",")]
    g = GEOMETRIES[args.geometry]
    built = kernels.Q8Kernels(kernels.build(variant=args.kernels)) if args.kernels else kernels.load()
    threads = args.threads or len(os.sched_getaffinity(0))
    contexts = [args.context] + ([args.short_context] if args.short_context else [])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        index, step_bytes, lora_bytes = write_weights(folder, g, block=blocks[0], lora_rank=args.lora_rank)
        print(f"weights written in {time.perf_counter() - t0:.1f} s: {step_bytes / 1e9:.2f} GB read per step"
              + (f", branches {lora_bytes / 1e9:.2f} GB" if lora_bytes else ""), flush=True)
        info = SimpleNamespace(decoder={"native": index}, routed=bool(args.lora_rank))
        base = native_decode.NativeDecoder(folder, info, built, threads=threads)
        base.wait_loaded()
        builds = {"this": base}
        block_bytes = {}
        for block in blocks[1:]:
            sub = folder / f"block{block}"
            sub.mkdir()
            other_index, block_bytes[block], _ = write_weights(sub, g, block=block, lora_rank=args.lora_rank)
            other_info = SimpleNamespace(decoder={"native": other_index}, routed=bool(args.lora_rank))
            builds[f"block {block}"] = native_decode.NativeDecoder(sub, other_info, built, threads=threads)
            builds[f"block {block}"].wait_loaded()
        if args.half_cache:
            builds["kv float16"] = native_decode.NativeDecoder(folder, info, built, threads=threads,
                                                               kv_cache="float16", _weights=base._w)
        if args.compare_small_pages:
            native_decode._Arena.HUGE_PAGES = False
            builds["small pages"] = native_decode.NativeDecoder(folder, info, built, threads=threads)
            builds["small pages"].wait_loaded()
            native_decode._Arena.HUGE_PAGES = True
        others = {}
        if args.compare_kernels:
            others["kernels"] = kernels.Q8Kernels(kernels.build(variant=args.compare_kernels))
        if args.baseline:
            others[args.baseline] = baseline_kernels(args.baseline, folder, args.kernels)
        for name, other in others.items():
            # the weights in the layout those kernels choose for themselves (packed where they pack), shared only
            # where that is this build's: a VNNI build can read an AVX2 build's row layout (suits), but runs its
            # batches over it at less than half its own speed, which is not the build a user would run
            own = all(lanes == other.pack_lanes(block) for block, lanes in base._w.lanes.items())
            builds[name] = native_decode.NativeDecoder(folder, info, other, threads=threads,
                                                       _weights=base._w if own else None)
            builds[name].wait_loaded()
        rng = np.random.default_rng(1)
        # routes: each sequence's gate (a merged decoder has no branches and ignores it)
        routes = {"base": lambda b: [0.0] * b}
        if args.lora_rank:
            routes.update(lora=lambda b: [1.0] * b, mixed=lambda b: [float(i % 2) for i in range(b)])
        pools = {}  # (build, context, batch) -> decoders
        for context in contexts:
            shape = (1, g["kv_heads"], context, g["head_dim"])
            presents = [rng.standard_normal(shape).astype(np.float32) for _ in range(2 * g["layers"])]
            for name, decoder in builds.items():
                for b in batches:
                    pools[name, context, b] = []
                    for _ in range(b):
                        d = decoder.spawn()
                        native_decode._Arena.HUGE_PAGES = name != "small pages"  # the caches too
                        d.start(presents, args.rounds * len(routes) * (args.steps + 1) + 2)
                        native_decode._Arena.HUGE_PAGES = True
                        pools[name, context, b].append(d)
        times: dict[tuple, list[float]] = {(*key, route): [] for key in pools for route in routes
                                           if route == "base" or (key[0] == "this" and (route != "mixed" or key[2] > 1))}
        for r in range(args.rounds):
            # interleaved step by step: every build, context, size and route takes one step in turn, so a spell
            # of slower memory (this VM's bandwidth changes by a third from minute to minute) hits all alike
            tokens = {key: [int(t) for t in rng.integers(0, g["vocab"], len(pools[key[:3]]))] for key in times}
            for _ in range(args.steps):
                for key in times:
                    decoders = pools[key[:3]]
                    gates = routes[key[3]](len(decoders))
                    s0 = time.perf_counter()
                    logits = native_decode.step_batch(decoders, tokens[key], gates)  # one decoder: its own step
                    times[key].append(time.perf_counter() - s0)
                    tokens[key] = [int(np.argmax(row)) for row in logits]
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"B={b} {statistics.median(times['this', args.context, b, 'base'][-args.steps:]) * 1e3:.0f} ms"
                for b in batches), flush=True)
    step = {key[:3] if key[3] == "base" else key: statistics.median(values) for key, values in times.items()}
    one = step["this", args.context, 1] if 1 in batches else None
    asides = {build: field for build, field, on in (
        ("kv float16", "kv_float16", args.half_cache), ("kernels", f"kernels_{args.compare_kernels}",
                                                         args.compare_kernels),
        ("small pages", "small_pages", args.compare_small_pages)) if on}
    rows = []
    for b in batches:
        s = step["this", args.context, b]
        row = {
            "batch": b, "step_seconds": round(s, 4), "tokens_per_second": round(b / s, 2),
            "speedup_vs_one": round((b / s) / (1 / one), 2) if one else None,
            "weight_bytes_per_step": step_bytes, "weight_bytes_per_token": step_bytes // b,
            "read_gb_per_second": round(step_bytes / s / 1e9, 2),
            "read_share_at_one_sequence_rate": round(one / s, 3) if one else None,
        }
        if args.short_context:
            short = step["this", args.short_context, b]
            row["attention_share"] = round(max(0.0, s - short) / s, 3)
        if args.baseline:
            old = step[args.baseline, args.context, b]
            row["baseline_step_seconds"] = round(old, 4)
            row["baseline_tokens_per_second"] = round(b / old, 2)
        for build, field in asides.items():  # contenders beside the main rows, each against its own one stream
            other, other_one = step[build, args.context, b], step.get((build, args.context, 1))
            row[field] = {"step_seconds": round(other, 4), "tokens_per_second": round(b / other, 2),
                          "speedup_vs_one": round(other_one / other * b, 2) if other_one else None}
        if args.half_cache and args.short_context:
            half = step["kv float16", args.context, b]
            row["kv_float16"]["attention_share"] = round(
                max(0.0, half - step["kv float16", args.short_context, b]) / half, 3)
        for block in blocks[1:]:
            other = step[f"block {block}", args.context, b]
            row[f"block_{block}"] = {"step_seconds": round(other, 4), "tokens_per_second": round(b / other, 2),
                                     "weight_bytes_per_step": block_bytes[block]}
        for route in [r for r in list(routes)[1:] if ("this", args.context, b, r) in step]:
            other = step["this", args.context, b, route]
            row[f"route_{route}"] = {"step_seconds": round(other, 4), "tokens_per_second": round(b / other, 2),
                                     "x_base_route_step": round(other / s, 3)}
        rows.append(row)
    result = {
        "benchmark": "batched_decode", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(), "command": "python " + " ".join(sys.argv),
        "machine": {**machine.cpu_facts(), "python": platform.python_version(), "kernel_isa": built.isa,
                    "threads": threads},
        "geometry": args.geometry, "context": args.context, "steps_per_round": args.steps, "rounds": args.rounds,
        "baseline": args.baseline, "block": blocks[0], "lora_rank": args.lora_rank,
        "lora_bytes_per_step_on_the_lora_route": lora_bytes, "results": rows,
        "notes": "Random int8 weights at the real geometry in the MatMulNBits layout; every sequence's tokens are "
                 "the bits it gets alone (tests/runtime/test_batching.py). Where the step goes: "
                 "read_share_at_one_sequence_rate is the one-sequence step over this size's step, i.e. the share a "
                 "read of the weights at the single-stream rate would take; attention_share is (step at --context "
                 "- step at --short-context) / step, the per-sequence attention over the cache; the rest is the "
                 "int8 products and the small per-sequence work between them. baseline_*: the kernels of git "
                 "revision `baseline`, timed in the same rounds; kv_float16 (with --half-cache): decoders "
                 "keeping their caches in float16; small_pages (with --compare-small-pages): weights and caches "
                 "in memory not advised as huge pages; kernels_X (with --compare-kernels X): the X build of "
                 "the kernels (avx2: the path AVX2-only CPUs run) on this machine; block_N: the same with "
                 "weights in blocks of N; "
                 "route_lora / route_mixed (with --lora-rank): every sequence on the LoRA route / the routes "
                 "alternating in the batch, against the base-route step of the main rows.",
    }
    print(f"{'batch':>5} {'step ms':>8} {'tok/s':>7} {'speed-up':>8} {'GB/s':>6} {'read':>5} {'attn':>5}"
          + (f" {'baseline ms':>11} {'tok/s':>7}" if args.baseline else ""))
    for row in rows:
        print(f"{row['batch']:>5} {row['step_seconds'] * 1e3:>8.0f} {row['tokens_per_second']:>7.2f} "
              f"{row['speedup_vs_one'] or 0:>8.2f} {row['read_gb_per_second']:>6.1f} "
              f"{row['read_share_at_one_sequence_rate'] or 0:>5.2f} {row.get('attention_share', 0):>5.2f}"
              + (f" {row['baseline_step_seconds'] * 1e3:>11.0f} {row['baseline_tokens_per_second']:>7.2f}"
                 if args.baseline else ""))
    for route in list(routes)[1:]:
        print(f"{route} route: " + ", ".join(
            f"B={row['batch']} {row[f'route_{route}']['step_seconds'] * 1e3:.0f} ms "
            f"(x{row[f'route_{route}']['x_base_route_step']:.2f}) {row[f'route_{route}']['tokens_per_second']:.2f} "
            "tok/s" for row in rows if f"route_{route}" in row))
    labels = {"kv float16": "float16 caches", "kernels": f"{args.compare_kernels} kernels",
              "small pages": "4 KiB pages"}
    for build, field in asides.items():
        print(f"{labels[build]}: " + ", ".join(
            f"B={row['batch']} {row[field]['step_seconds'] * 1e3:.0f} ms "
            f"{row[field]['tokens_per_second']:.2f} tok/s" for row in rows))
    for block in blocks[1:]:
        print(f"blocks of {block}: " + ", ".join(
            f"B={row['batch']} {row[f'block_{block}']['step_seconds'] * 1e3:.0f} ms "
            f"{row[f'block_{block}']['tokens_per_second']:.2f} tok/s" for row in rows))
    out = Path(args.out) if args.out else RESULTS / f"batched_decode_{args.geometry}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
